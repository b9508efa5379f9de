"""RUN/report.md, its figures and curves.json: what a run measured."""
