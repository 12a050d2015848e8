rule fuse:
    """Chained fusion of one section: reference component maps predicted at every finer level."""
    input:
        maps=lambda wc: [f"results/{wc.section}/maps_{m}.h5" for m in CHAIN],
        transforms=lambda wc: pair_files(wc.section, "transform", "json"),
        ions=f"results/{{section}}/ions_{REF}.h5",
        targets=f"results/nmf/{REF}.targets.json",
        code=code("fuse"),
    output:
        fused=[f"results/{{section}}/fused_{m}.h5" for m in CHAIN[1:]],
        report="results/{section}/fusion.json",
    log:
        "logs/fuse/{section}.log",
    benchmark:
        "results/benchmarks/fuse/{section}.tsv"
    params:
        **named(
            method=config["fusion"]["method"],
            n_components=config["fusion"]["n_components"],
            scales_px=config["fusion"]["scales_px"],
            alpha_se=config["fusion"]["alpha_se"],
            consistency=config["fusion"]["consistency"],
            min_coverage=config["fusion"]["min_coverage"],
            targets=TARGETS,
            ppm=config["targets"]["ppm"],
            min_target_r=config["fusion"]["min_target_r"],
            min_gain=config["fusion"]["min_gain"],
            seed=config["seed"],
        ),
    threads: 2
    resources:
        mem_mb=lambda wc, input, attempt: int(2000 + 20 * size_mb(input.maps)) * attempt,
        runtime=lambda wc, input, attempt: 30 * attempt,
    retries: 1  # a job killed for memory reruns asking for twice as much
    conda:
        "../envs/fuse.yaml"
    script:
        "../scripts/fuse.py"


rule products:
    """Ion images of the targets at every level (PNG + float TIFF) and ROI mean spectra."""
    input:
        reference=f"results/{{section}}/maps_{REF}.h5",
        fused=[f"results/{{section}}/fused_{m}.h5" for m in CHAIN[1:]],
        masks=lambda wc: [r["mask"] for r in section_rois(wc.section) if "mask" in r],
        code=code("products"),
    output:
        [reported_product(f) for f in product_files("{section}")],
    log:
        "logs/products/{section}.log",
    benchmark:
        "results/benchmarks/products/{section}.tsv"
    params:
        **named(
            targets=TARGETS,
            ppm=config["targets"]["ppm"],
            rois=lambda wc: section_rois(wc.section),
        ),
    threads: 1
    resources:
        mem_mb=lambda wc, input, attempt: int(1000 + 4 * size_mb(input)) * attempt,
        runtime=lambda wc, input, attempt: 10 * attempt,
    conda:
        "../envs/fuse.yaml"
    script:
        "../scripts/products.py"


rule export_imzml:
    """A fused product as imzML (reference m/z axis), when export.imzml is set."""
    input:
        fused="results/{section}/fused_{modality}.h5",
        code=code("export_imzml"),
    output:
        imzml="results/{section}/fused_{modality}.imzML",
        ibd="results/{section}/fused_{modality}.ibd",
    log:
        "logs/export_imzml/{section}_{modality}.log",
    benchmark:
        "results/benchmarks/export_imzml/{section}_{modality}.tsv"
    params:
        **named(
            mode=config["export"]["mode"],
            top_n=config["export"]["top_n"],
        ),
    threads: 1
    resources:
        mem_mb=lambda wc, input, attempt: int(1000 + 4 * size_mb(input.fused)) * attempt,
        runtime=lambda wc, input, attempt: int(10 + size_mb(input.fused) / 10) * attempt,
    conda:
        "../envs/convert.yaml"
    script:
        "../scripts/export_imzml.py"
