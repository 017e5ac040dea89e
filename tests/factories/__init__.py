"""What tests share: models, bundles, synthetic manifests and devices, data paths, the CLI.
tests/ is on sys.path (pyproject: pythonpath), so a test says `from factories.models import ...`."""
