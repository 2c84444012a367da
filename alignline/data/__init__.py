"""Data for every stage: the built-in task suite, loaders for real data, and pretraining shards.

    alignline.data.tasks    generate_suite / write_suite / gold_score (the built-in verifiable tasks)
    alignline.data.loaders  load_records(path, kind=...) with column/role mapping and full validation
    alignline.data.shards   build_shards / PackedBlocks / BlockSampler (memory-mapped, resumable)

Submodules are imported explicitly so `import alignline.data` stays cheap.
"""
