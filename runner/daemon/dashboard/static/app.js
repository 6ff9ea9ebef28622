// The dashboard's live parts. Every page works without this file; it only keeps a page current:
// the runs table and a run's log, through server-sent events (EventSource reconnects by itself,
// sending the last line number it saw as Last-Event-ID, so no line is lost or doubled), and
// asks before the forms that cancel or roll back (without it, the daemon asks on a page).
"use strict";

// A log pane follows its new lines while it is scrolled to its end; scrolled up, it stays where
// the reader put it, and follows again once they scroll back down to the end (as GitLab's does).
function atEnd(pre) {
  return pre.scrollHeight - pre.scrollTop - pre.clientHeight < 24;
}

function followPane(pre) {
  if (pre.dataset.follow) { return; }
  pre.dataset.follow = "1";
  pre.scrollTop = pre.scrollHeight;
  pre.addEventListener("scroll", function () { pre.dataset.follow = atEnd(pre) ? "1" : "0"; });
}

function swap(el, url) {
  return fetch(url, {credentials: "same-origin", headers: {"Accept": "text/html"}})
    .then(function (r) { if (r.ok) { return r.text(); } throw new Error(r.status); })
    .then(function (html) {
      // What the reader unfolded (the commit message's body) stays unfolded.
      var open = Array.prototype.map.call(el.querySelectorAll("details[open][id]"), function (d) { return d.id; });
      el.innerHTML = html;
      open.forEach(function (id) { var d = document.getElementById(id); if (d) { d.open = true; } });
    })
    .catch(function () { /* the next event tries again */ });
}

function followRuns(tbody) {
  var pending = null;
  var source = new EventSource("/runs/events");
  source.addEventListener("changed", function () {
    if (pending) { return; }
    pending = setTimeout(function () { pending = null; swap(tbody, tbody.dataset.live); }, 250);
  });
}

function stageLog(container, stage) {
  var id = "log-" + stage;
  var section = document.getElementById(id);
  if (!section) {
    var none = document.getElementById("no-logs");
    if (none) { none.remove(); }
    section = document.createElement("section");
    section.className = "log";
    section.id = id;
    section.setAttribute("aria-label", "log of " + stage);
    var h = document.createElement("h3");
    h.textContent = stage;
    var pre = document.createElement("pre");
    pre.tabIndex = 0;
    section.appendChild(h);
    section.appendChild(pre);
    container.appendChild(section);
  }
  var pane = section.querySelector("pre");
  followPane(pane);
  return pane;
}

function followRun(logs) {
  var container = document.getElementById("log-stages");
  var summary = document.getElementById("summary");
  var state = document.getElementById("live-state");
  var url = logs.dataset.events + "?after=" + encodeURIComponent(logs.dataset.after || "0");
  var source = new EventSource(url);
  var refreshing = null;
  Array.prototype.forEach.call(container.querySelectorAll("section.log pre"), followPane);
  function refresh() {
    if (refreshing || !summary || !summary.dataset.live) { return; }
    refreshing = setTimeout(function () { refreshing = null; swap(summary, summary.dataset.live); }, 150);
  }
  source.addEventListener("log", function (e) {
    var line = JSON.parse(e.data);
    if (document.getElementById("L" + line.seq)) { return; }
    var pre = stageLog(container, line.stage);
    var atBottom = window.innerHeight + window.scrollY >= document.body.scrollHeight - 40;
    var span = document.createElement("span");
    span.className = "line";
    span.id = "L" + line.seq;
    span.dataset.t = line.t;
    span.dataset.received = String(Date.now() / 1000);
    span.innerHTML = line.html;  // escaped by the daemon (views.ansi_to_html)
    pre.appendChild(span);
    pre.appendChild(document.createTextNode("\n"));
    logs.dataset.after = String(line.seq);
    if (pre.dataset.follow === "1") { pre.scrollTop = pre.scrollHeight; }
    if (atBottom) { window.scrollTo(0, document.body.scrollHeight); }
  });
  // Sent as soon as the stream connects, then at every change: the stages' states now. The
  // tables are reloaded when they show others (a stage may have ended before the stream was
  // there to say so).
  source.addEventListener("changed", function (e) {
    var head = document.getElementById("run-head");
    var state = JSON.parse(e.data).state;
    if (!head || head.dataset.state !== state) { refresh(); }
  });
  source.addEventListener("end", function (e) {
    source.close();
    var status = JSON.parse(e.data).status;
    if (state) { state.textContent = "The run ended: " + status + "."; }
    if (summary && summary.dataset.live) {
      swap(summary, summary.dataset.live).then(function () { delete summary.dataset.live; });
    }
  });
}

// Forms that stop or change what runs say so first. The answer travels as confirmed=yes; a
// form sent without it (no script) gets the daemon's page that asks.
document.addEventListener("submit", function (e) {
  var form = e.target;
  if (!form.dataset || !form.dataset.confirm || !form.elements.confirmed) { return; }
  if (window.confirm(form.dataset.confirm)) {
    form.elements.confirmed.value = "yes";
  } else {
    e.preventDefault();
  }
});

document.addEventListener("DOMContentLoaded", function () {
  var rows = document.getElementById("runs-rows");
  if (rows && rows.dataset.live) { followRuns(rows); }
  var logs = document.getElementById("logs");
  if (logs && logs.dataset.events) { followRun(logs); }
});
