// Live regions (jobs/live.py pushes, the htmx ws extension swaps). A container with
// ws-connect and data-live holds regions marked data-live-refresh (each with an hx-get and
// hx-trigger="live-refresh"). Channel messages are at-most-once, so whenever the socket opens,
// first time or after a reconnect, the regions are re-fetched over HTTP. While the socket is
// down they are polled instead, and a quiet note says so.
(function () {
  "use strict";
  var POLL_MS = 2000;

  function container(event) {
    return event.target && event.target.closest ? event.target.closest("[data-live]") : null;
  }

  function refresh(live) {
    live.querySelectorAll("[data-live-refresh]").forEach(function (region) {
      htmx.trigger(region, "live-refresh");
    });
  }

  function setPaused(live, paused) {
    var note = live.querySelector(".live-note");
    if (note) note.hidden = !paused;
    live.classList.toggle("live-paused", paused);
    if (paused && !live.livePoll) {
      live.livePoll = setInterval(function () { refresh(live); }, POLL_MS);
    } else if (!paused && live.livePoll) {
      clearInterval(live.livePoll);
      live.livePoll = null;
    }
  }

  function checkbox(root, name, value) {
    return root.querySelector("input[type=checkbox][name='" + CSS.escape(name) + "'][value='" +
      CSS.escape(value) + "']");
  }

  function tickedIn(root) {
    return Array.prototype.map.call(root.querySelectorAll("input[type=checkbox]:checked"),
      function (box) { return [box.name, box.value]; });
  }

  // A re-fetched region (data-live-refresh; it needs an id) keeps what the viewer was doing in
  // it: the ticks of the bulk-action boxes whose rows are still in it, the text typed into its
  // fields (a reject reason half written) and the focus, so a new review item arriving while
  // someone types does not wipe the reason or send their Enter nowhere. Read just before the
  // swap, so boxes ticked while the request was out are kept too. Keyed by id, since an
  // outerHTML swap puts a new element in the old one's place.
  var kept = {};

  function typedIn(root) {
    return Array.prototype.filter.call(root.querySelectorAll("input[type=text][name], textarea[name]"),
      function (field) { return field.value !== field.defaultValue; })
      .map(function (field) { return [field.name, field.value]; });
  }

  document.addEventListener("htmx:beforeSwap", function (event) {
    var region = event.detail.target;
    if (!region || !region.id || !region.hasAttribute("data-live-refresh")) return;
    delete kept[region.id];
    if (!event.detail.shouldSwap) return;
    var focused = document.activeElement;
    kept[region.id] = {
      ticks: tickedIn(region),
      typed: typedIn(region),
      focus: focused && focused.name && region.contains(focused) ? focused.name : null
    };
  });
  document.addEventListener("htmx:afterSwap", function (event) {
    var region = event.target;
    var state = region && region.id && kept[region.id];
    if (!state || !region.hasAttribute("data-live-refresh")) return;
    delete kept[region.id];
    state.ticks.forEach(function (tick) {
      var box = checkbox(region, tick[0], tick[1]);
      if (box) box.checked = true;
    });
    state.typed.forEach(function (entry) {
      var field = region.querySelector("[name='" + CSS.escape(entry[0]) + "']");
      if (field && "value" in field) field.value = entry[1];
    });
    if (state.focus) {
      var again = region.querySelector("[name='" + CSS.escape(state.focus) + "']");
      if (again) {
        again.focus();
        if (typeof again.setSelectionRange === "function" && again.value) {
          again.setSelectionRange(again.value.length, again.value.length);
        }
      }
    }
  });

  document.addEventListener("htmx:oobBeforeSwap", function (event) {
    var target = event.target;
    var fragment = event.detail.fragment;
    // A row swapped in keeps the tick of its bulk-action checkbox. It is rendered once for
    // everyone who follows the list, not for this viewer, so it may take a box away (the job
    // finished) but never adds one the page did not render (the viewer may not act on that
    // job); the next re-fetch, rendered for the viewer, shows any box that is due.
    fragment.querySelectorAll("input[type=checkbox]").forEach(function (fresh) {
      var box = checkbox(target, fresh.name, fresh.value);
      if (!box) fresh.remove();
      else if (box.checked) fresh.checked = true;
    });
    // The page's marker says its regions are stale (a job was created on the list; a batch or
    // the review inbox changed): re-fetch them, at most once a second, and always after the
    // last notice (a CSV upload creates many jobs, a batch settles many rows).
    var live = target.hasAttribute("data-live-stale") && container(event);
    if (!live || live.liveStalePending) return;
    live.liveStalePending = setTimeout(function () {
      live.liveStalePending = null;
      refresh(live);
    }, 1000);
  });

  // A list socket carries the rows of every job its viewer may see, but a page shows one
  // filtered page of them (and a new job has no row until the table is fetched again): a
  // fragment whose target is not on this page is dropped instead of failing its out-of-band
  // swap (htmx:oobErrorNoTarget). So is a row older than the one shown (data-version, the
  // job's last change): the web process and the workers each push rows, and one rendered
  // earlier may arrive later. Only for socket messages; HTTP responses pass unchanged.
  function older(fragment, shown) {
    var fresh = fragment.getAttribute("data-version");
    var current = shown.getAttribute("data-version");
    return fresh !== null && current !== null && Number(fresh) < Number(current);
  }

  htmx.defineExtension("live-targets", {
    transformResponse: function (text, xhr) {
      if (xhr) return text;
      var holder = document.createElement("template");
      holder.innerHTML = text;
      Array.prototype.slice.call(holder.content.children).forEach(function (fragment) {
        if (!fragment.id) return;
        var shown = document.getElementById(fragment.id);
        if (!shown || older(fragment, shown)) fragment.remove();
      });
      return holder.innerHTML;
    }
  });

  // A form pushed by a worker was rendered without a request, so it has no CSRF token: give a
  // POST form the page's own (the one htmx sends, from <body hx-headers>) as it is submitted.
  document.addEventListener("submit", function (event) {
    var form = event.target;
    if (form.method !== "post" || form.elements.csrfmiddlewaretoken) return;
    var headers = JSON.parse(document.body.getAttribute("hx-headers") || "{}");
    if (!headers["X-CSRFToken"]) return;
    var token = document.createElement("input");
    token.type = "hidden";
    token.name = "csrfmiddlewaretoken";
    token.value = headers["X-CSRFToken"];
    form.appendChild(token);
  });

  // A process that found a group empty takes it as empty for a second without asking again
  // (jobs/live.py, UNWATCHED_CACHE_S): what changed in that second after this page joined is
  // caught by a second re-fetch once it has passed.
  var RECHECK_MS = 1500;
  document.addEventListener("htmx:wsOpen", function (event) {
    var live = container(event);
    if (!live) return;
    setPaused(live, false);
    refresh(live);
    clearTimeout(live.liveRecheck);
    live.liveRecheck = setTimeout(function () { refresh(live); }, RECHECK_MS);
  });
  ["htmx:wsClose", "htmx:wsError"].forEach(function (name) {
    document.addEventListener(name, function (event) {
      var live = container(event);
      if (live) setPaused(live, true);
    });
  });
})();
