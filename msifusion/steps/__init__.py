"""Pipeline steps: one function per workflow job, taking plain paths and parameters.

The Snakemake scripts (``scripts/``) and the command line both call these, so that a stage behaves
the same inside and outside the workflow. Algorithms live in the stage modules (``msifusion.nmf``,
``msifusion.fuse``, ...); a step only reads inputs, calls them, checks the results and writes its
outputs atomically. One module per rule group, each importing only what its jobs run: the code a
job depends on, which reruns it when edited, is the import closure of its step module
(:mod:`msifusion.codedeps`). Defaults of configurable settings are the schema's
(:func:`msifusion.schema.default`).
"""
