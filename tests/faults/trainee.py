"""A small, unmodified-looking training script the fault tests run (usually under ``gradtel run``).

Its variables cover every state gradtel reports: ``w`` and ``extra_*`` train normally, ``cut`` never gets a
gradient (missing), ``dead`` always gets exact zeros. The step is a ``tf.function`` so thousands of steps take
seconds. It tells the test where it is through files (never stdout pipes, which could block it):

- ``--progress F``: the number of steps taken so far (rewritten atomically every few steps);
- ``--done F``: written with the final step count once training is over;
- ``--stop F``: train until this file exists (with ``--steps 0``);
- ``--hold F``: after training, wait until this file exists (a final scrape happens meanwhile);
- ``--then``: how the script ends: ``ok`` returns, ``raise`` raises, ``exit3`` calls ``sys.exit(3)``,
  ``sleep`` waits to be killed by a signal.
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def _write(path: str | None, text: str) -> None:
    if path:
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--progress")
    parser.add_argument("--done")
    parser.add_argument("--stop")
    parser.add_argument("--hold")
    parser.add_argument("--extra", type=int, default=0, help="extra trained variables (a bigger scrape)")
    parser.add_argument("--every", type=int, default=10, help="progress is written every N steps")
    parser.add_argument("--then", choices=["ok", "raise", "exit3", "sleep"], default="ok")
    args = parser.parse_args()

    import keras
    import numpy as np
    import tensorflow as tf

    w = keras.Variable(np.full(4, 0.5, "float32"), name="w")
    cut = keras.Variable(np.zeros(1, "float32"), name="cut")
    dead = keras.Variable(np.ones(2, "float32"), name="dead")
    extra = [keras.Variable(np.full(3, 0.1 * (i + 1), "float32"), name=f"extra_{i}") for i in range(args.extra)]
    variables = [w, cut, dead, *extra]
    optimizer = keras.optimizers.SGD(1e-3)
    x = tf.constant([1.0, 2.0, 3.0, 4.0])

    @tf.function
    def step() -> None:
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(tf.square(w * x - 1.0)) + 0.0 * tf.reduce_sum(dead)
            for e in extra:
                loss += 1e-3 * tf.reduce_sum(tf.square(e))
        optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables, strict=True))

    steps = 0
    while (args.steps and steps < args.steps) or (not args.steps and not os.path.exists(args.stop)):
        step()
        steps += 1
        if steps % args.every == 0:
            _write(args.progress, str(steps))
    _write(args.progress, str(steps))
    _write(args.done, str(steps))
    print(f"trainee: {steps} steps", flush=True)
    while args.hold and not os.path.exists(args.hold):
        time.sleep(0.05)
    if args.then == "raise":
        raise RuntimeError("trainee failed on purpose")
    if args.then == "exit3":
        sys.exit(3)
    if args.then == "sleep":
        time.sleep(600)


if __name__ == "__main__":
    main()
