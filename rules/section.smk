rule crop:
    """One section of one modality: its ROI of the component maps and its tissue mask."""
    input:
        nmf=lambda wc: section_components(wc.section, wc.modality),
        code=code("crop"),
    output:
        "results/{section}/maps_{modality}.h5",
    log:
        "logs/crop/{section}/{modality}.log",
    benchmark:
        "results/benchmarks/crop/{section}/{modality}.tsv"
    params:
        **named(
            file_id=lambda wc: STUDY.acquisition(wc.section, wc.modality).file_id,
            imzml=lambda wc: STUDY.acquisition(wc.section, wc.modality).path,
            roi=lambda wc: STUDY.acquisition(wc.section, wc.modality).roi_param,
            auto_index=lambda wc: STUDY.acquisition(wc.section, wc.modality).auto_index,
            auto_count=lambda wc: STUDY.acquisition(wc.section, wc.modality).auto_count,
            pixel_size_um=lambda wc: MODS[wc.modality]["pixel_size_um"],
            force_pixel_size=lambda wc: MODS[wc.modality]["force_pixel_size"],
            dilation_px=config["tissue"]["dilation_px"],
            min_size_px=config["tissue"]["min_size_px"],
            all_tissue=lambda wc: MODS[wc.modality]["all_tissue"],
            seed=config["seed"],
        ),
    threads: 1
    resources:
        mem_mb=lambda wc, input, attempt: int(1000 + 2 * size_mb(input.nmf)) * attempt,
        runtime=lambda wc, input, attempt: 10 * attempt,
    conda:
        "../envs/register.yaml"
    script:
        "../scripts/crop.py"


rule ion_images:
    """The targets' measured ion images over one section of the reference (raw spectra summed in
    each target's ppm window): what every fused target image must reproduce when averaged back."""
    input:
        converted=lambda wc: converted_file(REF, STUDY.acquisition(wc.section, REF).file_id),
        maps=f"results/{{section}}/maps_{REF}.h5",
        targets=f"results/nmf/{REF}.targets.json",
        code=code("ion_images"),
    output:
        f"results/{{section}}/ions_{REF}.h5",
    log:
        "logs/ion_images/{section}.log",
    benchmark:
        "results/benchmarks/ion_images/{section}.tsv"
    params:
        **named(
            targets=TARGETS,
            ppm=config["targets"]["ppm"],
        ),
    threads: 1
    resources:
        mem_mb=lambda wc, input, attempt: int(1000 + 2 * size_mb(input.maps)) * attempt,
        runtime=lambda wc, input, attempt: int(10 + size_mb(input.converted) / 100) * attempt,
    conda:
        "../envs/register.yaml"
    script:
        "../scripts/ion_images.py"


rule register:
    """Rigid (or affine) registration of an adjacent chain pair: fine -> coarse, multi-start."""
    input:
        coarse="results/{section}/maps_{coarse}.h5",
        fine="results/{section}/maps_{fine}.h5",
        code=code("register"),
    output:
        transform="results/{section}/transform_{coarse}_{fine}.json",
        qc=report("results/{section}/qc_{coarse}_{fine}.png", caption=caption("registration_qc"),
                  category="Registration", subcategory="{section}",
                  labels={"section": "{section}", "pair": "{coarse} -> {fine}"}),
    log:
        "logs/register/{section}/{coarse}_{fine}.log",
    benchmark:
        "results/benchmarks/register/{section}/{coarse}_{fine}.tsv"
    params:
        **named(
            model=config["registration"]["model"],
            n_starts=config["registration"]["n_starts"],
            mirror=config["registration"]["mirror"],
            iterations=config["registration"]["iterations"],
            min_score=config["registration"]["min_score"],
            min_margin=config["registration"]["min_margin"],
            min_boundary=config["registration"]["min_boundary"],
            min_ncc=config["registration"]["min_ncc"],
            min_image_similarity=config["registration"]["min_image_similarity"],
            scale_range=config["registration"]["scale_range"],
            seed=config["seed"],
        ),
    # one thread: the images are small, and torch's OpenMP threads slow down 5x when the
    # cores are shared with other jobs
    threads: 1
    resources:
        mem_mb=lambda wc, input, attempt: int(2000 + 4 * size_mb(input)) * attempt,
        runtime=lambda wc, input, attempt: 20 * attempt,
    retries: 1  # a job killed for memory reruns asking for twice as much
    conda:
        "../envs/register.yaml"
    script:
        "../scripts/register.py"


rule registration_summary:
    """One table of the registration scores of every section and chain pair (for the report)."""
    input:
        transforms=[f"results/{s}/transform_{c}_{f}.json" for s in SECTIONS for c, f in STUDY.pairs()],
        code=code("registration_summary"),
    output:
        table=report("results/registration.tsv", caption=caption("registration_table"),
                     category="Registration", subcategory="Scores"),
    log:
        "logs/registration_summary.log",
    params:
        **named(
            pairs=[[s, c, f] for s in SECTIONS for c, f in STUDY.pairs()],
        ),
    threads: 1
    resources:
        mem_mb=500,
        runtime=5,
    conda:
        "../envs/register.yaml"
    script:
        "../scripts/registration_summary.py"
