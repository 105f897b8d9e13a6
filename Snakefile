# ntkcl: empirical NTK dynamics under task shifts.
#
#   snakemake --cores 2 --config scale=demo    the demo on the bundled digits data (CPU;
#                                              experiments with `demo: false` left out)
#   snakemake --cores all                      the paper-scale suite (GPUs; see README)
#
# Results tree (<scale> is `paper` or `demo`):
#
#   results/data/<dataset>.h5                        prepared dataset (prepare_data)
#   results/<scale>/runs/<experiment>/<run>.h5       kernel archive of one run (train)
#   results/<scale>/work/<experiment>/<run>/         in-progress archive + checkpoint;
#                                                    kept when a job dies, so a rerun
#                                                    resumes; removed when it finishes
#   results/<scale>/metrics/<experiment>/<run>.nc    metrics per dump (reduce)
#   results/<scale>/metrics/<experiment>.nc          runs combined on named dims (aggregate)
#   results/<scale>/figures/<experiment>.{pdf,png}   the experiment's figure (plot)
#   results/<scale>/figures/<experiment>-summary.{pdf,png}
#                                                    switch measures against the
#                                                    similarity or alpha (summary)
#   results/<scale>/claims/<experiment>.csv          the paper's claims, measured (claims)
#   results/<scale>/claims.csv                       every experiment's claims in one
#                                                    table (claims_table)
#   results/<scale>/logs/<rule>/...                  one log per job
#   results/<scale>/benchmarks/train/...             time and memory of each train job
#
# Every rule is a thin call into the `ntkcl` package (workflow/scripts/ntkcl_rule.py);
# the config is validated against workflow/schemas/config.schema.yaml before any job.

from snakemake.utils import min_version

min_version("9.0")


configfile: "config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/resources.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/metrics.smk"
include: "workflow/rules/figures.smk"


rule all:
    default_target: True
    input:
        final_outputs(),
