#!/usr/bin/env python
"""Run a rayprune sweep on Ray Tune (the same as ``rayprune sweep``).

    python launch/sweep.py --space search_spaces/quickstart.yaml          # a local Ray
    python launch/sweep.py --space FILE --address auto                    # join a running cluster
    python launch/sweep.py --space FILE --resume                          # continue an interrupted sweep
    ray submit launch/cluster.yaml launch/sweep.py -- --space ~/rayprune/search_spaces/FILE --address auto

``ray submit`` copies only this file to the head node, so it imports the installed package
(launch/cluster.yaml installs it on every node) with absolute imports and does nothing else.
"""

import sys

from rayprune.cli import sweep_main as main

if __name__ == "__main__":
    sys.exit(main())
