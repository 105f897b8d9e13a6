# Write one dataset, once, as a prepared HDF5 file. A local rule: compute nodes
# often have no network, and torchvision may need to download.
rule prepare_data:
    output:
        "results/data/{dataset}.h5",
    log:
        "results/logs/prepare_data/{dataset}.log",
    localrule: True
    conda:
        "../../envs/ntkcl.yaml"
    params:
        data=data_config,
    script:
        "../scripts/ntkcl_rule.py"
