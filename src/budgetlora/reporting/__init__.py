"""Numbers and pages about predictions: metrics, label-free accuracy estimates, and the report
(Markdown, JSON, PNG)."""
