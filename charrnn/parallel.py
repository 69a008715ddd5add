"""Many devices and many hosts, with JAX's own multi-controller runtime.

Data parallelism on a one-axis mesh named ``data``:

    mesh = make_mesh()                       # all devices of all processes
    params, optimizer state      -> replicated        NamedSharding(mesh, P())
    batch x, y [B, T], carry [B, H] -> rows sharded    NamedSharding(mesh, P('data'))

The train step is one ``jax.jit`` of a ``jax.shard_map``
(``step.make_train_step(model, optimizer, mesh)``): each device runs the forward
and backward pass on its rows, then the loss and the gradient are averaged over
the devices (one all-reduce), so the gradient the step sees (and clips by its
global norm) is the gradient of the whole batch's mean loss, exactly as on one
device, not a per-device one. Dropout masks are the whole batch's too (each
device takes its rows of them). Written per device rather than left to XLA's
partitioner, which measured slower on a CPU split into devices
(docs/design-notes.md, "shard_map against XLA's partitioner").

Several hosts: every process runs the same program (``initialize`` first).
The batcher is deterministic, so each process computes the same global
window and hands JAX only the rows its own devices hold
(:func:`put_process_local`); only process 0 writes metrics and config.json;
orbax checkpoints are written by all processes together.

A sweep (many runs in one program, a vmapped run axis) can put its run axis on
the same mesh instead of the batch: :func:`run_axis_sharding`, :func:`shard_runs`.

With one device nothing here is used: :class:`DataParallel` is a pass-through
and the single-device path is the plain jitted step.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from charrnn.errors import UserError

DATA_AXIS = "data"


class ParallelError(UserError):
    """A batch or run count that does not split over the devices, or a bad launch."""


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, auto: bool = False) -> bool:
    """Join JAX's multi-controller runtime; True when this is a multi-process run.

    Explicit: ``coordinator_address`` ("host:port" of process 0),
    ``num_processes`` and ``process_id`` (0 … num_processes-1), the same
    address and count on every process. ``auto``: no arguments, JAX reads them
    from the environment (TPU VMs and pod slices, Slurm, Open MPI, Kubernetes).
    Must run before anything touches a device. Neither: a single process,
    nothing to do.
    """
    explicit = (coordinator_address, num_processes, process_id)
    if auto and any(v is not None for v in explicit):
        raise ParallelError("--distributed reads the cluster from the environment; do not also "
                            "pass --coordinator_address/--num_processes/--process_id")
    if not auto and all(v is None for v in explicit):
        return False
    if not auto:
        if any(v is None for v in explicit):
            raise ParallelError("a multi-process launch needs all of --coordinator_address, "
                                "--num_processes and --process_id")
        if num_processes < 1 or not 0 <= process_id < num_processes:
            raise ParallelError(f"--process_id must be in [0, {num_processes}), got {process_id}")
    # CPU processes exchange gradients over gloo (GPUs use NCCL, TPUs ICI/DCN);
    # older jax versions had no CPU collectives unless this is set.
    if jax.config.jax_cpu_collectives_implementation is None:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        if auto:
            jax.distributed.initialize()
        else:
            jax.distributed.initialize(coordinator_address, num_processes, process_id)
    except (RuntimeError, ValueError) as e:
        hint = (" (--distributed found no TPU pod, Slurm or MPI job in the environment; pass "
                "--coordinator_address, --num_processes and --process_id)") if auto else ""
        first_line = str(e).splitlines()[0]
        raise ParallelError(f"jax.distributed.initialize failed: {first_line}{hint}") from None
    return jax.process_count() > 1


def make_mesh(num_devices: int | None = None, axis: str = DATA_AXIS) -> Mesh:
    """A one-axis mesh over the first ``num_devices`` devices (default: all, all processes).

    Auto axis type: sharding is propagated by XLA, so code written for one
    device (an embedding lookup on a sharded batch included) runs unchanged.
    """
    n = jax.device_count() if num_devices is None else num_devices
    if num_devices is not None and not 1 <= n <= jax.device_count():
        raise ParallelError(f"asked for {n} devices but {jax.device_count()} are available")
    devices = jax.devices()[:n] if num_devices is not None else None
    return jax.make_mesh((n,), (axis,), axis_types=(jax.sharding.AxisType.Auto,),
                         devices=devices)


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array (parameters, optimizer state, scalars)."""
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """The leading axis (batch streams) split over the mesh's data axis."""
    return NamedSharding(mesh, P(mesh.axis_names[0]))


def run_axis_sharding(mesh: Mesh) -> NamedSharding:
    """A sweep's leading run axis split over the mesh: each device trains R/N runs."""
    return NamedSharding(mesh, P(mesh.axis_names[0]))


def check_divisible(size: int, mesh: Mesh, what: str) -> None:
    """Raise a ParallelError unless ``size`` splits evenly over the mesh's devices."""
    n = mesh.devices.size
    if size % n:
        raise ParallelError(
            f"{what} = {size} does not split over {n} devices; use a multiple of {n} "
            "(or make fewer devices visible, e.g. CUDA_VISIBLE_DEVICES=0,1)")


def process_rows(sharding: NamedSharding, global_shape: tuple[int, ...]) -> np.ndarray:
    """Indices along axis 0 of the rows this process's devices hold, ascending.

    This is the process-local slice that ``jax.make_array_from_process_local_data``
    expects: the rows of the process's shards, concatenated in index order.
    """
    rows = set()
    for index in sharding.addressable_devices_indices_map(global_shape).values():
        rows.update(range(*index[0].indices(global_shape[0])))
    return np.array(sorted(rows), dtype=np.int64)


def put_process_local(value, sharding: NamedSharding) -> jax.Array:
    """The global array ``value`` (the same on every process) placed with ``sharding``.

    Each process hands JAX only the rows its own devices hold; a replicated
    sharding hands over the whole value.
    """
    value = np.asarray(value)
    if value.ndim and not sharding.is_fully_replicated:
        local = value[process_rows(sharding, value.shape)]
    else:
        local = value
    return jax.make_array_from_process_local_data(sharding, local, value.shape)


def replicate(tree, mesh: Mesh):
    """Every leaf of ``tree`` replicated over the mesh."""
    sharding = replicated(mesh)
    return jax.tree.map(lambda v: _put(v, sharding), tree)


def shard_batch(tree, mesh: Mesh):
    """Every leaf's leading axis sharded over the mesh; 0-d leaves (flags) replicated."""
    rows, whole = batch_sharding(mesh), replicated(mesh)
    return jax.tree.map(lambda v: _put(v, rows if np.ndim(v) else whole), tree)


def shard_runs(tree, mesh: Mesh):
    """A sweep's stacked pytree (every leaf [R, ...], R runs) with its runs split over the mesh.

    Use it on the stacked states, the stacked batches and the thresholds τ [R]
    alike; the vmapped step then runs R/N runs on each device, with no
    communication between devices.
    """
    sharding = run_axis_sharding(mesh)
    for leaf in jax.tree.leaves(tree):
        check_divisible(np.shape(leaf)[0], mesh, "the number of runs")
    return jax.tree.map(lambda v: _put(v, sharding), tree)


def _put(value, sharding):
    """One leaf (host array, local or global jax.Array, PRNG key) placed with ``sharding``."""
    if isinstance(value, jax.Array) and value.sharding == sharding:
        return value
    if isinstance(value, jax.Array) and not value.is_fully_addressable:
        return jax.device_put(value, sharding)  # already global: a reshard
    if isinstance(value, jax.Array) and jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key):
        impl = jax.random.key_impl(value)
        return jax.random.wrap_key_data(_put(jax.random.key_data(value), sharding), impl=impl)
    if jax.process_count() == 1:
        return jax.device_put(value, sharding)
    return put_process_local(jax.device_get(value), sharding)


@dataclasses.dataclass
class DataParallel:
    """Where training runs: one device (``mesh`` None, a pass-through) or a data mesh."""
    mesh: Mesh | None

    @classmethod
    def create(cls, batch_size: int, num_devices: int | None = None) -> "DataParallel":
        """A data mesh over all devices (or the first ``num_devices``); none for one device.

        ``batch_size`` is B, the number of streams; it must split over the devices.
        """
        n = jax.device_count() if num_devices is None else num_devices
        if n == 1 and jax.process_count() == 1:
            return cls(mesh=None)
        mesh = make_mesh(num_devices)
        check_divisible(batch_size, mesh, "train.batch_size")
        return cls(mesh=mesh)

    @property
    def num_devices(self) -> int:
        return 1 if self.mesh is None else self.mesh.devices.size

    @property
    def is_main(self) -> bool:
        """The process that writes metrics, config.json and progress lines."""
        return jax.process_index() == 0

    def state_shardings(self, state):
        """Shardings for a TrainState (or its shapes): ``carry`` [B, H] sharded like the
        batch, everything else replicated."""
        rows, whole = batch_sharding(self.mesh), replicated(self.mesh)
        shardings = jax.tree.map(lambda _: whole, state)
        return shardings.replace(carry=jax.tree.map(lambda _: rows, state.carry))

    def create_state(self, make_state):
        """``make_state()`` (a TrainState), built directly in place on the mesh.

        One device: called as is. A mesh: traced once and jitted with the state's
        shardings as outputs, so every device (of every process) computes its own
        part and nothing passes through the host.
        """
        if self.mesh is None:
            return make_state()
        shardings = self.state_shardings(jax.eval_shape(make_state))
        return jax.jit(make_state, out_shardings=shardings)()

    def place_state(self, state):
        """An existing TrainState (identical on every process) moved onto the mesh."""
        if self.mesh is None:
            return state
        return jax.tree.map(_put, state, self.state_shardings(state))

    def wrap_step(self, step_fn):
        """``step_fn(state, batch)`` fed with the batch rows sharded over the mesh."""
        if self.mesh is None:
            return step_fn
        mesh = self.mesh

        def step(state, batch):
            return step_fn(state, shard_batch(batch, mesh))
        return step

    def wrap_eval(self, eval_fn):
        """``eval_fn(params, carry, x, y, mask)`` with its windows sharded (or replicated
        when the eval batch does not split over the devices)."""
        if self.mesh is None:
            return eval_fn
        mesh = self.mesh

        def evaluate(params, carry, x, y, mask):
            place = shard_batch if x.shape[0] % mesh.devices.size == 0 else replicate
            carry, x, y, mask = place((carry, x, y, mask), mesh)
            return eval_fn(params, carry, x, y, mask)
        return evaluate

    def should_stop(self, flag, sync_point: bool) -> bool:
        """Whether to stop after this step, given this process's ``flag`` (a signal seen).

        One process: the flag itself. Several: they must stop at the same step,
        since they save the checkpoint together, so they agree only at sync points
        (log steps; an all-gather every step would stall the pipeline): True
        everywhere when the flag is set on any process.
        """
        if jax.process_count() == 1:
            return bool(flag)
        if not sync_point:
            return False
        from jax.experimental import multihost_utils
        return bool(np.any(multihost_utils.process_allgather(np.int32(bool(flag)))))
