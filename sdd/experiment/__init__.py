"""The experiment: a recipe, the job graph it plans, and running that graph.

    recipe.py   the recipe file (Recipe, load and its checks), the built-in variants and the
                comparisons the report makes, the step kinds a variant can take (StepKind, STEPS),
                the Planner that turns a recipe into Jobs (`sdd <stage> ...` command lines)
    execute.py  running Jobs: worker processes, --jobs N, --launcher; skip done, resume interrupted
    slurm.py    submitting Jobs as sbatch jobs chained by afterok dependencies

This room sits below the stages and the CLI and imports neither: `sdd run` (sdd/stages/run.py)
hands `execute` the in-process runner.
"""
