rule evaluate:
    """Fused vs bicubic ion images against ground truth (phantom studies with a truth folder)."""
    input:
        truth=lambda wc: truth_files(),
        fused=[f"results/{s}/fused_{m}.h5" for s in SECTIONS for m in CHAIN[1:]],
        reference=[f"results/converted/{REF}/{STUDY.acquisition(s, REF).file_id}.h5" for s in SECTIONS],
        section_maps=[f"results/{s}/maps_{REF}.h5" for s in SECTIONS],
        code=code("evaluate"),
    output:
        table=report("results/evaluation.tsv", caption=caption("evaluation"),
                     category="Accuracy", subcategory="Against ground truth"),
    log:
        "logs/evaluate.log",
    benchmark:
        "results/benchmarks/evaluate.tsv"
    params:
        **named(
            sections=SECTIONS,
            chain=CHAIN,
            targets=TARGETS,
            ppm=config["targets"]["ppm"],
        ),
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        "../envs/fuse.yaml"
    script:
        "../scripts/evaluate.py"
