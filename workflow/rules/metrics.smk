# Reduce one kernel archive to metrics per dump (xarray, NetCDF).
rule reduce:
    input:
        archive="results/{scale}/runs/{experiment}/{run}.h5",
    output:
        "results/{scale}/metrics/{experiment}/{run}.nc",
    log:
        "results/{scale}/logs/reduce/{experiment}/{run}.log",
    conda:
        "../../envs/ntkcl.yaml"
    script:
        "../scripts/ntkcl_rule.py"


# Combine the runs of one experiment into one NetCDF with a named dimension per
# grid key (width, regime, ...) and the seed.
rule aggregate:
    input:
        run_metrics,
    output:
        "results/{scale}/metrics/{experiment}.nc",
    log:
        "results/{scale}/logs/aggregate/{experiment}.log",
    conda:
        "../../envs/ntkcl.yaml"
    params:
        dims=run_dims,
    script:
        "../scripts/ntkcl_rule.py"


# Measure the paper's checkable claims on the experiment's metrics.
rule claims:
    input:
        "results/{scale}/metrics/{experiment}.nc",
    output:
        report(
            "results/{scale}/claims/{experiment}.csv",
            caption="../report/claims.rst",
            category="Claims",
            labels={"experiment": "{experiment}"},
        ),
    log:
        "results/{scale}/logs/claims/{experiment}.log",
    localrule: True
    conda:
        "../../envs/ntkcl.yaml"
    script:
        "../scripts/ntkcl_rule.py"


# Every experiment's claims in one table: per experiment and claim, the checks
# made, how many hold, and the range of the measured values.
rule claims_table:
    input:
        experiment_claims,
    output:
        report(
            "results/{scale}/claims.csv",
            caption="../report/claims_table.rst",
            category="Claims",
            labels={"experiment": "all experiments"},
        ),
    log:
        "results/{scale}/logs/claims_table.log",
    localrule: True
    conda:
        "../../envs/ntkcl.yaml"
    params:
        experiments=scale_experiments,
    script:
        "../scripts/ntkcl_rule.py"
