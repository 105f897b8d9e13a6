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
    resources:
        mem_mb=lambda wildcards, attempt: 2048 * attempt,
    params:
        run=find_run,
        work_dir=lambda wildcards: (
            f"results/{wildcards.scale}/work/{wildcards.experiment}/{wildcards.run}"
        ),
    script:
        "../scripts/ntkcl_rule.py"
