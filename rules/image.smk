rule image:
    """One microscopy image of an image level: block-averaged to its working grid (bounded
    memory), its features (stain features or channels) and its tissue mask."""
    input:
        image=lambda wc: STUDY.files(wc.modality)[wc.file_id],
        code=code("image"),
    output:
        maps=image_file("{modality}", "{file_id}"),
        figure=report(image_file("{modality}", "{file_id}", "png"), caption=caption("image"),
                      category="Images", subcategory="{modality}",
                      labels={"modality": "{modality}", "file": "{file_id}"}),
    log:
        "logs/image/{modality}/{file_id}.log",
    benchmark:
        "results/benchmarks/image/{modality}/{file_id}.tsv"
    params:
        **named(
            pixel_size_um=lambda wc: MODS[wc.modality]["pixel_size_um"],
            force_pixel_size=lambda wc: MODS[wc.modality]["force_pixel_size"],
            stain=lambda wc: MODS[wc.modality]["image"]["stain"],
            max_pixels=lambda wc: MODS[wc.modality]["image"]["max_pixels"],
            memory_mb=lambda wc: MODS[wc.modality]["image"]["memory_mb"],
        ),
    threads: 1
    resources:
        # the reading buffer, the working grid as read (float32, up to 4 channels) and its
        # features, masks and figure
        mem_mb=lambda wc, attempt: int(
            500 + MODS[wc.modality]["image"]["memory_mb"]
            + 40 * MODS[wc.modality]["image"]["max_pixels"] / 2**20) * attempt,
        runtime=lambda wc, input, attempt: int(10 + size_mb(input.image) / 50) * attempt,
    retries: 1  # a job killed for memory reruns asking for twice as much
    conda:
        "../envs/image.yaml"
    script:
        "../scripts/image.py"
