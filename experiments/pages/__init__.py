"""The generated pages: REPORT.md (report.py) and QUALITY.md (quality.py), with their renderers."""
