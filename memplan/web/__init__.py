"""`memplan serve`: the planner in the browser.

api.py turns a query string into the same result objects the CLI prints (estimate, per-GPU verdicts, fit);
app.py is the small Starlette app that serves them as JSON next to one static page (static/). The page draws
what the API returns and computes nothing of its own. No torch: the estimate path only.
"""
