#!/usr/bin/env python
"""Run a rayprune sweep on Ray Tune (the same as ``rayprune sweep``).

    python launch/sweep.py --space search_spaces/quickstart.yaml          # a local Ray
    python launch/sweep.py --space FILE --address auto                    # join a running cluster
    python launch/sweep.py --space FILE --resume                          # continue an interrupted sweep
    ray submit launch/cluster.yaml launch/sweep.py -- --space "rayprune/search_spaces/FILE" --address auto \
        --mlflow-uri http://127.0.0.1:5000 --storage-path s3://BUCKET/rayprune/ray_results
    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . -- python launch/sweep.py \
        --space search_spaces/FILE --address auto --mlflow-uri http://127.0.0.1:5000 \
        --storage-path s3://BUCKET/rayprune/ray_results

``ray submit`` runs the script in the head's home: give ``--space`` relative to it, quoted (your
own shell would expand ``~`` into *your* home). A path that does not exist there but whose
``search_spaces/...`` tail is in the installed package's repository is used from there, with a
warning. ``ray job submit`` runs it in a copy of ``--working-dir`` in Ray's temporary package
folder, which Ray deletes with the session: without ``--mlflow-uri`` and ``--storage-path`` the
sweep logs to the head's MLflow server and stores its results in the storage path that
launch/cluster.yaml records on the head (else ``~/ray_results`` there), or refuses to start when
the head records no server.

``ray submit`` copies only this file to the head node, so it imports the installed package
(launch/cluster.yaml installs it on every node) with absolute imports and does nothing else.
"""

import sys

from rayprune.cli import sweep_main as main

if __name__ == "__main__":
    sys.exit(main())
