"""Look of the dashboard: the Gradio theme and a little CSS (passed to ``launch()``, Gradio 6 style)."""
from __future__ import annotations

import gradio as gr

THEME = gr.themes.Soft(primary_hue="indigo", secondary_hue="emerald", neutral_hue="slate",
                       text_size="sm", spacing_size="sm", radius_size="sm")

CSS = """
.gradio-container { max-width: 1800px !important; margin: 0 auto !important; }
.tq-header h1 { margin-bottom: 0; }
.tq-header p { margin-top: 4px; color: var(--body-text-color-subdued); }
.tq-banner { padding: 6px 10px; border-radius: 6px; background: #fef3c7; color: #92400e; font-size: 13px; }
.tq-error { color: #b91c1c; background: #fef2f2; border: 1px solid #fecaca; border-radius: 6px;
            padding: 6px 10px; font-size: 13px; margin: 2px 0; white-space: pre-wrap; }
.tq-ok { color: var(--body-text-color); background: #f0fdf4; border: 1px solid #bbf7d0; border-radius: 6px;
         padding: 6px 10px; font-size: 13px; margin: 2px 0; }
.tq-muted { color: var(--body-text-color-subdued); font-size: 13px; padding: 4px 0; }
.tq-src { color: #6b7280; font-size: 12px; }
.tq-problems { margin: 2px 0 4px 18px; font-size: 13px; color: #7f1d1d; }
.tq-reco { border: 2px solid #6366f1; border-radius: 8px; padding: 8px 12px; background: #eef2ff; }
.tq-reco h3 { margin: 0 0 4px 0; }
.tq-reco ul, .tq-detail ul { margin: 4px 0 0 18px; }
.tq-reco li, .tq-detail li { margin: 1px 0; font-size: 13px; }
.tq-top { font-size: 13px; margin-top: 6px; }
.tq-figs { font-size: 13.5px; font-weight: 600; margin: 4px 0; }
.tq-change { border-left: 4px solid #10b981; padding: 6px 12px; background: #ecfdf5; border-radius: 4px; }
.tq-change li { font-size: 13px; }
.tq-detail table { font-size: 12.5px; border-collapse: collapse; width: 100%; }
.tq-detail td, .tq-detail th { border-bottom: 1px solid #e5e7eb; padding: 3px 6px; text-align: left;
                               vertical-align: top; }
.tq-run { border: 1px solid #e5e7eb; border-radius: 8px; padding: 8px 12px; overflow-wrap: anywhere; min-width: 0; }
.tq-run-title { font-size: 14px; margin-bottom: 6px; }
.tq-badge { color: white; border-radius: 10px; padding: 1px 9px; font-size: 12px; font-weight: 600; }
.tq-grid { display: grid; grid-template-columns: repeat(auto-fit, minmax(110px, 1fr)); gap: 6px; }
.tq-kv { display: flex; flex-direction: column; background: #f8fafc; border-radius: 6px; padding: 4px 8px; }
.tq-kv span { font-size: 11px; color: #6b7280; }
.tq-kv b { font-size: 15px; }
.tq-reason { margin-top: 6px; color: #b91c1c; font-size: 13px; }
.tq-stages { display: flex; gap: 14px; list-style: none; padding: 0; margin: 8px 0 0 0; font-size: 13px;
             flex-wrap: wrap; }
.tq-stages .done { color: #15803d; } .tq-stages .now { color: #2563eb; font-weight: 600; }
.tq-stages .todo { color: #9ca3af; }
.tq-stages .stopped { color: #b45309; } .tq-stages .failed { color: #b91c1c; }
.tq-stages .prep { color: #475569; }
.tq-cards { display: grid; grid-template-columns: repeat(auto-fit, minmax(260px, 1fr)); gap: 10px; margin: 6px 0; }
.tq-card { border: 1px solid #e5e7eb; border-radius: 8px; padding: 8px 12px; background: white; }
.tq-card-reco { border: 2px solid #6366f1; background: #eef2ff; }
.tq-card-none { border-color: #fecaca; background: #fef2f2; }
.tq-card-head { font-size: 14px; } .tq-rank { color: #6b7280; font-weight: 600; }
.tq-pill { background: #4f46e5; color: white; border-radius: 10px; padding: 0 8px; font-size: 11px; }
.tq-card-nums { display: flex; gap: 14px; margin: 6px 0 4px 0; flex-wrap: wrap; }
.tq-card-nums span { display: flex; flex-direction: column; }
.tq-card-nums i { font-style: normal; font-size: 11px; color: #6b7280; }
.tq-card-nums b { font-size: 16px; } .tq-card-nums small { font-size: 11px; color: #6b7280; }
.tq-mem { display: flex; align-items: center; gap: 6px; font-size: 12px; margin: 2px 0; }
.tq-mem-label { width: 58px; color: #374151; }
.tq-mem-track { flex: 1; height: 8px; background: #e5e7eb; border-radius: 4px; overflow: hidden; }
.tq-mem-fill { display: block; height: 100%; }
.tq-mem-val { color: #6b7280; white-space: nowrap; }
.tq-card-cost { font-size: 12.5px; margin-top: 4px; }
.tq-card-why { font-size: 12.5px; color: #374151; margin-top: 4px; }
.tq-infeasible { font-size: 13px; border-left: 4px solid #d1d5db; padding: 4px 10px; background: #f9fafb; }
.tq-infeasible ul { margin: 2px 0 0 18px; }
#run_history, #matrix_table, #compare_table { max-width: 100%; min-width: 0; overflow-x: auto; }
.tq-history { max-height: 360px; overflow-y: auto; border: 1px solid #e5e7eb; border-radius: 8px; }
.tq-history-title { font-size: 13px; color: #6b7280; padding: 4px 8px; }
.tq-history table { table-layout: fixed; width: 100%; border-collapse: collapse; font-size: 12.5px; }
.tq-history th { position: sticky; top: 0; background: #f3f4f6; text-align: left; padding: 4px 6px; }
.tq-history td { border-top: 1px solid #e5e7eb; padding: 3px 6px; vertical-align: top; overflow-wrap: anywhere; }
.tq-history .st-failed { color: #b91c1c; } .tq-history .st-stopped { color: #b45309; }
.tq-history .st-finished { color: #15803d; }
/* the wizard's step buttons: readable (dark indigo on light indigo, contrast > 8:1), not grey on white */
button.tq-nav { background: #eef2ff !important; color: #3730a3 !important; border: 1px solid #6366f1 !important;
                font-weight: 600 !important; }
button.tq-nav:hover { background: #e0e7ff !important; }
.tq-log textarea { font-family: ui-monospace, monospace !important; font-size: 12px !important; }
"""

# Runs in the browser once the page loads (launch(js=...)): the run card's elapsed counter moves every
# second while a run is active (its element carries the start time; engine.fmt.duration's format), and
# the log tail follows its end whenever new lines arrive. No server event is needed for either.
CLIENT_JS = """
() => {
  const fmt = (s) => s < 90 ? `${Math.round(s)} s` : s < 5400 ? `${(s / 60).toFixed(1)} min`
    : s < 172800 ? `${(s / 3600).toFixed(1)} h` : `${(s / 86400).toFixed(1)} days`;
  let logLen = -1;
  setInterval(() => {
    document.querySelectorAll('.tq-elapsed[data-start]').forEach((el) => {
      el.textContent = fmt(Math.max(0, Date.now() / 1000 - parseFloat(el.dataset.start)));
    });
    const log = document.querySelector('#run_log textarea');
    if (log && log.value.length !== logLen) { logLen = log.value.length; log.scrollTop = log.scrollHeight; }
  }, 1000);
}
"""
