rule mz_axis:
    """The modality's m/z axis: its own ppm grid, or the reference's axis (published choice)."""
    input:
        converted=lambda wc: converted(wc.modality),
        reference=lambda wc: (
            [f"results/nmf/{REF}.axis.h5"]
            if MODS[wc.modality]["binning"]["mode"] == "reference"
            else []
        ),
        code=code("mz_axis"),
    output:
        "results/nmf/{modality}.axis.h5",
    log:
        "logs/mz_axis/{modality}.log",
    benchmark:
        "results/benchmarks/mz_axis/{modality}.tsv"
    params:
        **named(
            ppm=lambda wc: MODS[wc.modality]["binning"]["ppm"],
            min_pixels=lambda wc: MODS[wc.modality]["binning"]["min_pixels"],
            block_pixels=config["nmf"]["block_pixels"],
        ),
    threads: 1
    resources:
        mem_mb=lambda wc, input, attempt: 2000 * attempt,
        runtime=lambda wc, input, attempt: int(10 + size_mb(input.converted) / 100) * attempt,
    conda:
        "../envs/nmf.yaml"
    script:
        "../scripts/mz_axis.py"


rule check_targets:
    """Every target m/z has a column of the reference's m/z axis within targets.ppm (right after
    the reference's conversion, long before the fusion needs it)."""
    input:
        axis=f"results/nmf/{REF}.axis.h5",
        code=code("check_targets"),
    output:
        f"results/nmf/{REF}.targets.json",
    log:
        "logs/check_targets.log",
    params:
        **named(
            targets=TARGETS,
            ppm=config["targets"]["ppm"],
            modality=REF,
        ),
    threads: 1
    resources:
        mem_mb=500,
        runtime=5,
    conda:
        "../envs/nmf.yaml"
    script:
        "../scripts/check_targets.py"


rule nmf:
    """Sparse NMF over all files of one modality: one shared set of components."""
    input:
        converted=lambda wc: converted(wc.modality),
        axis="results/nmf/{modality}.axis.h5",
        code=code("nmf"),
    output:
        nmf="results/nmf/{modality}.h5",
        figure=report("results/nmf/{modality}_components.png", caption=caption("nmf"),
                      category="NMF", subcategory="Components",
                      labels={"modality": "{modality}", "grid": "as measured"}),
    log:
        "logs/nmf/{modality}.log",
    benchmark:
        "results/benchmarks/nmf/{modality}.tsv"
    params:
        **named(
            file_ids=lambda wc: list(STUDY.files(wc.modality)),
            rank=lambda wc: MODS[wc.modality]["nmf"]["rank"],
            normalize=lambda wc: MODS[wc.modality]["nmf"]["normalize"],
            transform=lambda wc: MODS[wc.modality]["nmf"]["transform"],
            backend=config["nmf"]["backend"],
            max_iter=config["nmf"]["max_iter"],
            tol=config["nmf"]["tol"],
            seed=config["seed"],
            device=config["nmf"]["device"],
            memory_gb=config["nmf"]["memory_gb"],
            block_pixels=config["nmf"]["block_pixels"],
        ),
    threads: 2
    resources:
        # the NMF keeps to nmf.memory_gb (out of core beyond it); binning and HDF5 on top
        mem_mb=lambda wc, input, attempt: int(
            1500 + min(1024 * config["nmf"]["memory_gb"], 4 * size_mb(input.converted))
        ) * attempt,
        runtime=lambda wc, input, attempt: int(20 + size_mb(input.converted) / 10) * attempt,
    retries: 1  # a job killed for memory reruns asking for twice as much
    conda:
        "../envs/nmf.yaml"
    script:
        "../scripts/nmf.py"


rule degrid:
    """Remove the scan-tile grid (ToF-SIMS) from the component maps."""
    input:
        nmf="results/nmf/{modality}.h5",
        code=code("degrid"),
    output:
        nmf="results/nmf/{modality}.degrid.h5",
        figure=report("results/nmf/{modality}_components.degrid.png", caption=caption("nmf"),
                      category="NMF", subcategory="Components",
                      labels={"modality": "{modality}", "grid": "removed"}),
        qc=report("results/nmf/{modality}.degrid_qc.png", caption=caption("grid_qc"),
                  category="Grid removal", subcategory="Component maps (after NMF)",
                  labels={"modality": "{modality}"}),
        report="results/nmf/{modality}.degrid.json",
    log:
        "logs/degrid/{modality}.log",
    benchmark:
        "results/benchmarks/degrid/{modality}.tsv"
    params:
        **named(
            tile_px=lambda wc: MODS[wc.modality]["grid"]["tile_px"],
            method=lambda wc: MODS[wc.modality]["grid"]["method"],
        ),
    threads: 1
    resources:
        mem_mb=lambda wc, input, attempt: int(1000 + 3 * size_mb(input.nmf)) * attempt,
        runtime=lambda wc, input, attempt: 15 * attempt,
    conda:
        "../envs/nmf.yaml"
    script:
        "../scripts/degrid.py"


rule degrid_converted:
    """Remove the scan-tile grid from one converted file before NMF (gain, value by value)."""
    input:
        converted="results/converted/{modality}/{file_id}.h5",
        code=code("degrid_converted"),
    output:
        converted="results/converted/{modality}/degrid/{file_id}.h5",
        qc=report("results/converted/{modality}/degrid/{file_id}_qc.png",
                  caption=caption("grid_qc"), category="Grid removal",
                  subcategory="Spectra (before NMF)",
                  labels={"modality": "{modality}", "file": "{file_id}"}),
        report="results/converted/{modality}/degrid/{file_id}.json",
    log:
        "logs/degrid_converted/{modality}/{file_id}.log",
    benchmark:
        "results/benchmarks/degrid_converted/{modality}/{file_id}.tsv"
    params:
        **named(
            tile_px=lambda wc: MODS[wc.modality]["grid"]["tile_px"],
            method=lambda wc: MODS[wc.modality]["grid"]["method"],
            mz_blocks=lambda wc: MODS[wc.modality]["grid"]["mz_blocks"],
        ),
    threads: 1
    resources:
        mem_mb=lambda wc, input, attempt: int(1000 + 2 * size_mb(input.converted)) * attempt,
        runtime=lambda wc, input, attempt: int(10 + size_mb(input.converted) / 50) * attempt,
    retries: 1  # a job killed for memory reruns asking for twice as much
    conda:
        "../envs/nmf.yaml"
    script:
        "../scripts/degrid_converted.py"
