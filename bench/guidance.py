"""Class guidance on digits: how often guided samples show the requested class.

    python -m trainers.classifier --model_dir=runs/digits_classifier      # train the classifier
    python -m bench.guidance --classifier_dir=runs/digits_classifier --diffusion_dir=runs/demo

For each guidance scale w and each label, draws samples with `class_conditional_sample` from the
trained diffusion run and classifies them with an independent judge: scikit-learn's logistic
regression fitted on the digits training split (about 96% accurate on the clean test split).
Reports the rate at which the judge sees the requested class, and seconds per sample.
Writes bench/results/guidance.json.
"""

import argparse
import os
import time

from bench import common  # noqa: E402

common.prepare()  # before TensorFlow is imported

import keras  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402

import vdm_tf  # noqa: E402
from trainers import configs, train  # noqa: E402


def judge():
    """Logistic regression on the digits training split, and its clean test accuracy."""
    x_train, y_train = vdm_tf.datasets.digits_arrays("train", with_labels=True)
    x_test, y_test = vdm_tf.datasets.digits_arrays("test", with_labels=True)
    model = LogisticRegression(max_iter=2000).fit(x_train.reshape(len(x_train), -1) / 255.0, y_train)
    return model, float(model.score(x_test.reshape(len(x_test), -1) / 255.0, y_test))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classifier_dir", default="runs/digits_classifier")
    parser.add_argument("--diffusion_dir", default="runs/demo")
    parser.add_argument("--scales", default="0,1,3")
    parser.add_argument("--labels", default="0,3,8")
    parser.add_argument("--num_samples", type=int, default=64)
    parser.add_argument("--sampler", default="ancestral")
    parser.add_argument("--num_steps", type=int, default=250)
    parser.add_argument("--output", default="bench/results/guidance.json")
    args = parser.parse_args()

    model = train.restore_for_inference(args.diffusion_dir, configs.saved_config(args.diffusion_dir))
    noisy = keras.saving.load_model(os.path.join(args.classifier_dir, "classifier.keras"))
    judge_model, judge_accuracy = judge()
    rows = []
    for scale in (float(s) for s in args.scales.split(",")):
        for label in (int(s) for s in args.labels.split(",")):
            guided = vdm_tf.conditional.ClassGuidedModel(model, noisy, label, scale)
            options = dict(sampler=args.sampler, num_steps=args.num_steps)
            vdm_tf.samplers.sample(guided, 2, seed=1, **options)  # trace
            start = time.perf_counter()
            x = vdm_tf.samplers.sample(guided, args.num_samples, seed=label, **options).numpy()
            seconds = time.perf_counter() - start
            predicted = judge_model.predict(x.reshape(len(x), -1) / 255.0)
            rows.append(
                dict(scale=scale, label=label, rate=float(np.mean(predicted == label)),
                     seconds_per_sample=seconds / len(x))
            )
            row = rows[-1]
            print(f"w={scale:<4} label={label}  rate {row['rate']:.3f}  {row['seconds_per_sample']:.3f} s/sample")
    print(f"judge accuracy on clean test digits: {judge_accuracy:.3f}")
    print(f"\n{'w':>5} | {'mean rate of the requested class':>32}")
    for scale in sorted({row["scale"] for row in rows}):
        rate = np.mean([row["rate"] for row in rows if row["scale"] == scale])
        print(f"{scale:>5} | {rate:>32.3f}")
    common.write_json(args.output, dict(settings=vars(args), judge_test_accuracy=judge_accuracy, rows=rows))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
