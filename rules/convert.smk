rule convert:
    """imzML -> HDF5 (CSR over acquired pixels), once per imzML file."""
    input:
        imzml=lambda wc: STUDY.files(wc.modality)[wc.file_id],
        ibd=lambda wc: os.path.splitext(STUDY.files(wc.modality)[wc.file_id])[0] + ".ibd",
        code=lib("convert"),
    output:
        "results/converted/{modality}/{file_id}.h5",
    log:
        "logs/convert/{modality}/{file_id}.log",
    benchmark:
        "results/benchmarks/convert/{modality}/{file_id}.tsv"
    params:
        pixel_size_um=lambda wc: MODS[wc.modality]["pixel_size_um"],
        block_pixels=config["nmf"]["block_pixels"],
    threads: 1
    resources:
        mem_mb=lambda wc, input, attempt: int(1000 + 0.5 * size_mb(input.ibd)) * attempt,
        runtime=lambda wc, input, attempt: int(10 + size_mb(input.ibd) / 50) * attempt,
    conda:
        "../envs/convert.yaml"
    script:
        "../scripts/convert.py"
