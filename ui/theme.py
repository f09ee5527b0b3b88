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
.tq-run { border: 1px solid #e5e7eb; border-radius: 8px; padding: 8px 12px; }
.tq-run-title { font-size: 14px; margin-bottom: 6px; }
.tq-badge { color: white; border-radius: 10px; padding: 1px 9px; font-size: 12px; font-weight: 600; }
.tq-grid { display: grid; grid-template-columns: repeat(7, minmax(90px, 1fr)); gap: 6px; }
.tq-kv { display: flex; flex-direction: column; background: #f8fafc; border-radius: 6px; padding: 4px 8px; }
.tq-kv span { font-size: 11px; color: #6b7280; }
.tq-kv b { font-size: 15px; }
.tq-reason { margin-top: 6px; color: #b91c1c; font-size: 13px; }
.tq-stages { display: flex; gap: 14px; list-style: none; padding: 0; margin: 8px 0 0 0; font-size: 13px;
             flex-wrap: wrap; }
.tq-stages .done { color: #15803d; } .tq-stages .now { color: #2563eb; font-weight: 600; }
.tq-stages .todo { color: #9ca3af; }
.tq-log textarea { font-family: ui-monospace, monospace !important; font-size: 12px !important; }
"""
