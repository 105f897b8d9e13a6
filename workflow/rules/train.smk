# Train one run on its task sequence, dumping the NTK on the probe set; writes the
# run's kernel archive. The in-progress archive and checkpoint live in the run's
# work folder, which survives a failed job, so a rerun continues where it stopped.
rule train:
    input:
        data=prepared_data,
    output:
        archive="results/{scale}/runs/{experiment}/{run}.h5",
    log:
        "results/{scale}/logs/train/{experiment}/{run}.log",
    benchmark:
        "results/{scale}/benchmarks/train/{experiment}/{run}.tsv"
    conda:
        "../../envs/ntkcl.yaml"
    threads: 1
    # Portable requests estimated from the run (workflow/rules/resources.smk), times
    # the attempt on each retry; a GPU only for `device: cuda` runs. Site-specific
    # values (partition, account, ...) go in the SLURM profile, never here.
    resources:
        runtime=train_runtime,
        mem_mb=train_mem_mb,
        gpu=train_gpus,
        cpus_per_gpu=train_cpus_per_gpu,
    params:
        run=find_run,
        work_dir=lambda wildcards: (
            f"results/{wildcards.scale}/work/{wildcards.experiment}/{wildcards.run}"
        ),
    script:
        "../scripts/ntkcl_rule.py"
