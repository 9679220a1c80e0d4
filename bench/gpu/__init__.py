"""The GPU validation kit (issue 12): prepare here, run there in three short commands.

See ``bench/gpu/README.md`` for the exact sequence. Modules:

* ``common``     -- results rows (JSON lines, appended as each row is done), run metadata,
                    CIFAR-10 parts (pack here, reassemble there), sizes of what travels
* ``prepare``    -- runs here: packs data parts and wheels, checks each command's 64 MiB total
* ``run``        -- runs there: the one entry (``--command 1|2|3``), stages below
* ``preflight``  -- imports, CUDA, engine and every method one step on a tiny net
* ``throughput`` -- stage A: engine vs plain DataLoader loop, interleaved (also used by
                    ``bench/train_throughput.py``)
* ``stage_b``    -- stage B: teacher + uniform, AST (+ random-search arm), l1, TAS on CIFAR-10
* ``stage_c``    -- stage C: latency at batch 1 and 64, MACs speed-up vs measured speed-up
* ``collect``    -- merges returned results into ``bench/results/<date>_<gpu>.jsonl``

Only the pure-torch core of rayprune is imported (no Ray, MLflow, Optuna).
"""
