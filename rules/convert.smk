rule convert:
    """imzML -> HDF5 (CSR over acquired pixels), once per imzML file."""
    input:
        imzml=lambda wc: STUDY.files(wc.modality)[wc.file_id],
        ibd=lambda wc: STUDY.ibd(wc.modality, wc.file_id),
        code=code("convert"),
    output:
        "results/converted/{modality}/{file_id}.h5",
    log:
        "logs/convert/{modality}/{file_id}.log",
    benchmark:
        "results/benchmarks/convert/{modality}/{file_id}.tsv"
    params:
        **named(
            block_mb=config["convert"]["block_mb"],
            xml_chunk_mb=config["convert"]["xml_chunk_mb"],
            verify_checksum=config["convert"]["verify_checksum"],
            full_xml_check=config["convert"]["full_xml_check"],
        ),
    threads: 2
    resources:
        # blocks + XML chunks, plus the spectrum index (64 bytes per spectrum, ~1 KB of XML each)
        mem_mb=lambda wc, input, attempt: int(
            500 + 6 * config["convert"]["block_mb"] + 12 * config["convert"]["xml_chunk_mb"]
            + size_mb(input.imzml) / 16) * attempt,
        runtime=lambda wc, input, attempt: int(
            10 + (size_mb(input.ibd) + size_mb(input.imzml)) / 100) * attempt,
    retries: 1  # a job killed for memory reruns asking for twice as much
    conda:
        "../envs/convert.yaml"
    script:
        "../scripts/convert.py"
