"""Benchmarks: scripts that print measured figures against a named baseline, run side by side. Run them as
modules from the repository root (`.venv/bin/python -m benchmarks.<name>`), so that no file here can shadow a
package of the project; each has a `--quick` mode that CI runs (that it completes, never a timing)."""
