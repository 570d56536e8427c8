"""Analysis scripts over saved plans and results (run as ``python -m analysis.<script>``)."""
