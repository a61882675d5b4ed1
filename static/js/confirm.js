// Ask before a destructive submit. A <form data-confirm="..."> (or the submit button pressed,
// <button data-confirm="...">, which wins) is sent only once the user accepts
// window.confirm(text). "{count}" in the text becomes the number of ticked checkboxes that
// belong to the form (inside it, or outside with form="<id>"); with none ticked nothing is
// asked, and the server says what to tick.
// Without JS the form submits as before: the server never relies on the question being asked.
(function () {
  "use strict";

  function ticked(form) {
    return Array.prototype.filter.call(form.elements, function (field) {
      return field.type === "checkbox" && field.checked;
    }).length;
  }

  // Capture phase, on the document: runs before htmx's or any other page's submit handler,
  // and stopping the event here keeps a declined submit from reaching them.
  document.addEventListener("submit", function (event) {
    var form = event.target;
    var button = event.submitter;
    var text = (button && button.getAttribute("data-confirm")) || form.getAttribute("data-confirm");
    if (!text) return;
    if (text.indexOf("{count}") !== -1) {
      var count = ticked(form);
      if (!count) return;
      text = text.split("{count}").join(String(count));
    }
    if (!window.confirm(text)) {
      event.preventDefault();
      event.stopPropagation();
    }
  }, true);
})();
