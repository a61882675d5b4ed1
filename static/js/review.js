// Review inbox keyboard shortcuts and the poll guard. Plain JS, no dependencies.
//   Item page: a approve · e edit · r retry · x reject · n next item · Ctrl/Cmd+Enter submit
//   Inbox:     j/k move · Enter/o open · n next available item
(function () {
  "use strict";

  function typing(target) {
    var tag = target && target.tagName;
    return tag === "INPUT" || tag === "TEXTAREA" || tag === "SELECT" || (target && target.isContentEditable);
  }

  function openPanel(id, fieldSelector) {
    var panel = document.getElementById(id);
    if (!panel) return;
    panel.open = true;
    var field = panel.querySelector(fieldSelector || "textarea, input[type=text], select");
    if (field) {
      field.focus();
      if (field.setSelectionRange && field.value) field.setSelectionRange(field.value.length, field.value.length);
    }
  }

  function submit(formId) {
    var form = document.getElementById(formId);
    var button = form && form.querySelector("button[type=submit]");
    if (button && !button.disabled) form.requestSubmit(button);
  }

  // --- inbox list: a selected row that survives the periodic refresh ---
  var selected = 0;
  function rows() { return Array.prototype.slice.call(document.querySelectorAll("tr[data-href]")); }
  function highlight() {
    var all = rows();
    if (!all.length) return;
    selected = Math.max(0, Math.min(selected, all.length - 1));
    all.forEach(function (row, i) { row.classList.toggle("selected", i === selected); });
    all[selected].scrollIntoView({ block: "nearest" });
  }

  document.addEventListener("keydown", function (event) {
    // Enter in the bulk reject reason means "reject": left to the browser, it would submit
    // the form with its first button, "Approve selected".
    if (event.key === "Enter" && event.target.matches && event.target.matches("#bulk-form input[name=reason]")) {
      event.preventDefault();
      var reject = event.target.form.querySelector("button[value=reject]");
      if (reject) event.target.form.requestSubmit(reject);
      return;
    }
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey) && typing(event.target)) {
      var form = event.target.form;
      if (form) { event.preventDefault(); form.requestSubmit(); }
      return;
    }
    if (event.key === "Escape" && typing(event.target)) { event.target.blur(); return; }
    if (typing(event.target) || event.ctrlKey || event.metaKey || event.altKey) return;

    var onItem = !!document.getElementById("review-actions");
    var key = event.key;
    if (onItem && key === "a") { event.preventDefault(); submit("approve-form"); }
    else if (onItem && key === "e") { event.preventDefault(); openPanel("edit-panel", "textarea"); }
    else if (onItem && key === "r") { event.preventDefault(); openPanel("retry-panel", "textarea"); }
    else if (onItem && key === "x") { event.preventDefault(); openPanel("reject-panel", "input[type=text]"); }
    else if (key === "n") {
      var next = document.getElementById("next-link");
      if (next) { event.preventDefault(); window.location.href = next.href; }
    } else if (key === "j" || key === "k") {
      if (!rows().length) return;
      event.preventDefault();
      if (document.querySelector("tr.selected")) selected += key === "j" ? 1 : -1;
      highlight();
    } else if ((key === "Enter" || key === "o") && document.querySelector("tr.selected")) {
      event.preventDefault();
      window.location.href = document.querySelector("tr.selected").dataset.href;
    }
  });

  // The inbox replaces its table when told it changed (live.js); skip that while the reviewer
  // has ticked boxes or is typing a bulk reason, so their selection is not thrown away, and
  // catch up once the last box is unticked.
  document.addEventListener("htmx:beforeRequest", function (event) {
    var table = document.getElementById("review-table");
    if (!table || event.detail.elt !== table) return;
    var busy = table.querySelector("input[type=checkbox]:checked") ||
      (document.activeElement && table.contains(document.activeElement) && typing(document.activeElement));
    if (busy) {
      event.preventDefault();
      table.dataset.stale = "1";
    }
  });
  document.addEventListener("change", function (event) {
    var table = document.getElementById("review-table");
    if (!table || !table.dataset.stale || !table.contains(event.target)) return;
    if (table.querySelector("input[type=checkbox]:checked")) return;
    delete table.dataset.stale;
    htmx.trigger(table, "live-refresh");
  });
  // After settle, not swap: htmx restores the fresh rows' attributes when it settles (~20 ms
  // later), which would take the highlight off again.
  document.addEventListener("htmx:afterSettle", function () {
    if (document.querySelector("tr[data-href]") && selected >= 0 && document.body.dataset.reviewMoved) highlight();
  });
  document.addEventListener("keydown", function (event) {
    if (event.key === "j" || event.key === "k") document.body.dataset.reviewMoved = "1";
  });
})();
