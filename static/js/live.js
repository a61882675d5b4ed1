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

  document.addEventListener("htmx:oobBeforeSwap", function (event) {
    var target = event.target;
    // A row swapped in keeps the tick of its bulk-action checkbox.
    target.querySelectorAll("input[type=checkbox]:checked").forEach(function (box) {
      var fresh = event.detail.fragment.querySelector(
        "input[type=checkbox][value='" + CSS.escape(box.value) + "']");
      if (fresh) fresh.checked = true;
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

  document.addEventListener("htmx:wsOpen", function (event) {
    var live = container(event);
    if (!live) return;
    setPaused(live, false);
    refresh(live);
  });
  ["htmx:wsClose", "htmx:wsError"].forEach(function (name) {
    document.addEventListener(name, function (event) {
      var live = container(event);
      if (live) setPaused(live, true);
    });
  });
})();
