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
            labels={"experiment": "{experiment}", "figure": "metrics"},
        ),
    log:
        "results/{scale}/logs/plot/{experiment}.log",
    localrule: True
    conda:
        "../../envs/ntkcl.yaml"
    params:
        layout=figure_layout,
        description=experiment_description,
        caption=figure_caption,
    script:
        "../scripts/ntkcl_rule.py"


# The class-overlap and class-frequency experiments' second figure: what happens
# at the switch (peak velocity, spike ratio, eigenvalue drop) against the
# similarity or alpha, for experiments whose config names `figure.summary`.
rule summary:
    input:
        "results/{scale}/metrics/{experiment}.nc",
    output:
        pdf="results/{scale}/figures/{experiment}-summary.pdf",
        png=report(
            "results/{scale}/figures/{experiment}-summary.png",
            caption="../report/summary.rst",
            category="Figures",
            labels={"experiment": "{experiment}", "figure": "switch summary"},
        ),
    log:
        "results/{scale}/logs/summary/{experiment}.log",
    localrule: True
    conda:
        "../../envs/ntkcl.yaml"
    params:
        x=summary_x,
        description=experiment_description,
        caption=summary_caption,
    script:
        "../scripts/ntkcl_rule.py"
