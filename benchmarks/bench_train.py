"""Training-step cost of each regime, side by side in one run, plus the trainer's overhead.

Prints: LCNN step / standard step, GradReg (exact double backprop) / standard,
GradReg (finite difference) / standard, CURE / standard, PGD-AT / standard, the
finite-difference gradient's accuracy against the exact one, and the trainer's
images/s (data, augmentation, metrics, progress bar included) against bare
model steps on pre-made tensors.

    python benchmarks/bench_train.py [--batch-size 64] [--reps 5] [--threads 2]
"""
import argparse
import statistics
import tempfile
import time

import timm
import torch

import lcnn_timm  # noqa: F401
from lcnn_timm.train import AdversarialConfig, LCNNTask, Trainer, load_config
from lcnn_timm.train.regularizers import frozen_state, gradreg_exact, gradreg_finite_difference

MODEL_KWARGS = dict(num_classes=10, in_chans=1, img_size=28, channels=[16, 32, 64, 128])


def timed_step(task, optimizer, images, labels, amp):
    start = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        result = task(images, labels)
    result["loss"].backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def step_seconds(tasks, images, labels, reps, amp):
    """Fastest of ``reps`` steps per task, the tasks interleaved round-robin (robust to a shared CPU)."""
    optimizers = {name: torch.optim.SGD(task.parameters(), lr=1e-3, momentum=0.9) for name, task in tasks.items()}
    times = {name: [] for name in tasks}
    for rep in range(reps + 1):  # rep 0 is warm-up
        for name, task in tasks.items():
            seconds = timed_step(task, optimizers[name], images, labels, amp)
            if rep:
                times[name].append(seconds)
    return {name: min(values) for name, values in times.items()}


def fd_accuracy(model_name, images, labels, step):
    """Cosine and relative error of the finite-difference GradReg parameter gradient against double backprop."""
    model = timm.create_model(model_name, **MODEL_KWARGS)
    params = [p for p in model.parameters() if p.requires_grad]
    loss_fn = lambda z: torch.nn.functional.cross_entropy(model(z), labels)  # noqa: E731
    grads = []
    for penalty in (gradreg_exact, lambda loss, x: gradreg_finite_difference(loss, x, loss_fn, step=step)):
        inputs = images.clone().requires_grad_(True)
        with frozen_state(model):  # the same buffers for both
            value = penalty(loss_fn(inputs), inputs)
        grads.append(torch.cat([g.flatten() for g in torch.autograd.grad(value, params, allow_unused=True)
                                if g is not None]))
    exact, approx = grads
    cosine = torch.nn.functional.cosine_similarity(exact, approx, dim=0).item()
    return cosine, ((approx - exact).norm() / exact.norm()).item()


def trainer_vs_bare(batch_size, samples, amp):
    with tempfile.TemporaryDirectory() as out:
        cfg = load_config("configs/fashion_mnist_lcnn.yaml", dict(
            output=out, train_num_samples=samples, epochs=1, batch_size=batch_size, amp=amp,
            plot=False, progress=False))
        trainer = Trainer(cfg)
        trainer.train_epoch()  # warm-up epoch
        trainer.epoch, trainer.batch = 1, 0
        start = time.perf_counter()
        trainer.train_epoch()
        trainer_ips = samples / (time.perf_counter() - start)
        images, labels = next(iter(trainer.train_loader))
        optimizer = trainer.optimizer
        start = time.perf_counter()
        for _ in range(len(trainer.train_loader)):
            timed_step(trainer.task, optimizer, images, labels, amp)
        bare_ips = samples / (time.perf_counter() - start)
    return trainer_ips, bare_ips


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--amp", action="store_true", help="bf16 autocast")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    images = torch.rand(args.batch_size, 1, 28, 28)
    labels = torch.randint(0, 10, (args.batch_size,))
    regimes = {
        "standard": ("cifar_resnet18", {}),
        "lcnn": ("lcnn_resnet18", dict(beta_weight=1e-3, gamma_weight=1e-3)),
        "gradreg_exact": ("cifar_resnet18", dict(gradreg_weight=1e-3)),
        "gradreg_fd": ("cifar_resnet18", dict(gradreg_weight=1e-3, gradreg_mode="finite_difference")),
        "lcnn_gradreg_exact": ("lcnn_resnet18", dict(beta_weight=1e-3, gamma_weight=1e-3, gradreg_weight=1e-3)),
        "cure": ("cifar_resnet18", dict(cure_weight=1e-3)),
        "adversarial": ("cifar_resnet18", dict(adversarial=AdversarialConfig())),
    }
    tasks = {name: LCNNTask(timm.create_model(model_name, **MODEL_KWARGS), torch.nn.CrossEntropyLoss(), **kwargs)
             for name, (model_name, kwargs) in regimes.items()}
    seconds = step_seconds(tasks, images, labels, args.reps, args.amp)
    for name in regimes:
        print(f"{name:>20}: {seconds[name] * 1e3:8.1f} ms/step  ratio to standard {seconds[name] / seconds['standard']:.2f}x")
    print(f"LCNN / standard: {seconds['lcnn'] / seconds['standard']:.2f}x")
    print(f"GradReg exact / standard: {seconds['gradreg_exact'] / seconds['standard']:.2f}x")
    print(f"GradReg finite-difference / standard: {seconds['gradreg_fd'] / seconds['standard']:.2f}x")
    print(f"GradReg finite-difference / exact: {seconds['gradreg_fd'] / seconds['gradreg_exact']:.2f}x")
    for model_name in ("cifar_resnet18", "lcnn_resnet18"):  # the FD error grows with the model's curvature
        for step in (1e-2, 1e-3, 1e-4):
            cosine, rel = fd_accuracy(model_name, images, labels, step)
            print(f"FD GradReg gradient vs exact, {model_name}, step {step:g}: cosine {cosine:.4f}, "
                  f"relative error {rel:.3f}")
    trainer_ips, bare_ips = trainer_vs_bare(args.batch_size, 8 * args.batch_size, args.amp)
    print(f"trainer {trainer_ips:.1f} img/s vs bare model step {bare_ips:.1f} img/s: {trainer_ips / bare_ips:.2f}x")


if __name__ == "__main__":
    main()
