"""Reproducible studies of bitsearch (run from the repository root as ``python -m studies.<study>``);
``studies.reference`` holds the reference implementations of other methods they compare against."""
