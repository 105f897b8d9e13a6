# Draw the experiment's figure in the style of the paper's Figure 1.
rule plot:
    input:
        "results/{scale}/metrics/{experiment}.nc",
    output:
        pdf="results/{scale}/figures/{experiment}.pdf",
        png=report(
            "results/{scale}/figures/{experiment}.png",
            caption="../report/figure.rst",
            category="Figures",
            labels={"experiment": "{experiment}"},
        ),
    log:
        "results/{scale}/logs/plot/{experiment}.log",
    localrule: True
    conda:
        "../../envs/ntkcl.yaml"
    params:
        layout=figure_layout,
        description=lambda wildcards: config["experiments"][wildcards.experiment].get(
            "description", wildcards.experiment
        ),
    script:
        "../scripts/ntkcl_rule.py"
