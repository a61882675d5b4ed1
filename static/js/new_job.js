// The new-job form after the browser's Back button: the browser restores the workload it had
// chosen, but the page it shows may be a fresh render with the default workload's fields (a
// text workload asked for a file). Fields rendered for another workload than the one chosen
// are fetched again, as choosing it does.
(function () {
  "use strict";
  window.addEventListener("pageshow", function () {
    var fields = document.getElementById("workload-fields");
    var select = document.querySelector("select[name=workload][hx-get]");
    if (!fields || !select || !window.htmx) return;
    if (select.value !== fields.getAttribute("data-workload")) htmx.trigger(select, "change");
  });
})();
