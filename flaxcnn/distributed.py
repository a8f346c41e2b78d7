"""Several processes, one training run: `jax.distributed` with bounded failure detection.

Every process runs the same `train.py` command with its own `--process-id`; process 0 also hosts
JAX's coordination service at `--coordinator HOST:PORT`. After `initialize`, `jax.devices()` lists
the devices of every process and one jitted step runs over all of them (XLA inserts the
cross-process collectives: NCCL on GPUs, gloo over TCP on CPUs).

A process that dies must not leave the others waiting forever. Two mechanisms bound the wait:

* A collective whose peer vanished fails at once (gloo: "Connection reset by peer" / "Connection
  closed by peer"). `train.py` recognises that with `is_peer_failure` and ends the process with
  `exit_peer_lost`: a one-line "lost contact with the other processes" message, exit status 4.
* JAX's coordination service marks a process dead when it sends no heartbeat for
  `heartbeat_timeout` seconds (a hung or frozen peer, a lost network), and every process loses
  it at once if process 0, its host, dies. JAX then ends every remaining process itself:
  "Terminating process because the JAX distributed service detected fatal errors. This most
  likely indicates that another task died", exit status 134 (SIGABRT), after a C++ stack
  trace. (jaxlib 0.10.2 cannot call a Python callback there instead: the status it passes has
  no Python conversion.)

Either way no process waits longer than `heartbeat_timeout` seconds for a dead peer.
"""

from __future__ import annotations

import os
import sys
import threading

# Exit status of a process whose peers were lost (a process died, was killed or hangs).
PEER_LOST_EXIT = 4
# Exit status of a process that could not connect to all the others in time.
INIT_FAILED_EXIT = 1
DEFAULT_HEARTBEAT_TIMEOUT = 100  # JAX's default, seconds
DEFAULT_INIT_TIMEOUT = 300  # JAX's default, seconds

# What the usual launchers set; JAX itself reads JAX_COORDINATOR_ADDRESS (and detects Slurm,
# Open MPI, ... when asked to with `coordinator="auto"`).
ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"


class DistributedError(RuntimeError):
    """The processes could not be started or connected."""


class SettingsError(DistributedError):
    """The flags or environment variables describe no valid set of processes."""


_state = {"process_id": 0, "num_processes": 1, "active": False}


def _env_int(name: str, environ) -> int | None:
    value = environ.get(name)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise SettingsError(f"{name}={value!r} is not an integer") from None


def settings(coordinator=None, num_processes=None, process_id=None, environ=None):
    """(coordinator, num_processes, process_id) from the flags, else the environment.

    Returns None when nothing asks for several processes (a plain single-process run).
    `coordinator="auto"` leaves everything to JAX's cluster detection (Slurm, Open MPI, ...).
    """
    environ = os.environ if environ is None else environ
    coordinator = coordinator or environ.get(ENV_COORDINATOR) or None
    if num_processes is None:
        num_processes = _env_int(ENV_NUM_PROCESSES, environ)
    if process_id is None:
        process_id = _env_int(ENV_PROCESS_ID, environ)
    if coordinator is None and num_processes is None and process_id is None:
        return None
    if coordinator == "auto":
        return ("auto", num_processes, process_id)
    if coordinator is None:
        raise SettingsError(
            f"--num-processes/--process-id need --coordinator HOST:PORT (or {ENV_COORDINATOR})"
        )
    host, sep, port = coordinator.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise SettingsError(f"--coordinator must be HOST:PORT, got {coordinator!r}")
    if num_processes is None or process_id is None:
        raise SettingsError(
            "--coordinator needs --num-processes and --process-id (or "
            f"{ENV_NUM_PROCESSES} and {ENV_PROCESS_ID})"
        )
    if num_processes < 1 or not 0 <= process_id < num_processes:
        raise SettingsError(
            f"--process-id must be in 0..{num_processes - 1} and --num-processes positive, got "
            f"--process-id {process_id} --num-processes {num_processes}"
        )
    return (coordinator, num_processes, process_id)


def _say(message: str):
    try:
        sys.stdout.flush()
    except Exception:  # noqa: BLE001 - stdout may be closed; the message still goes out
        pass
    os.write(2, (message.rstrip("\n") + "\n").encode(errors="replace"))


def describe() -> str:
    return f"process {_state['process_id']} of {_state['num_processes']}"


def _first_line(status) -> str:
    text = str(status).strip()
    return text.splitlines()[0][:300] if text else "no details"


def exit_peer_lost(status):
    """Reports a lost peer (a failed collective: `status` is its exception) and ends the
    process at once. `os._exit` skips JAX's shutdown barrier, which would wait for the dead
    peer until the heartbeat timeout and then abort with a stack trace."""
    _say(
        f"error: {describe()}: lost contact with the other processes of this run "
        f"({_first_line(status)}). "
        "Another process probably died or was killed; see its log. Checkpoints already written "
        f"are intact: restart every process with --resume. Exiting with status {PEER_LOST_EXIT}."
    )
    os._exit(PEER_LOST_EXIT)


def initialize(coordinator=None, num_processes=None, process_id=None, *,
               heartbeat_timeout: int = DEFAULT_HEARTBEAT_TIMEOUT,
               init_timeout: int = DEFAULT_INIT_TIMEOUT, environ=None) -> bool:
    """Starts `jax.distributed` if the flags or the environment ask for several processes.

    Must run before anything touches a JAX backend. Returns True when distributed mode is on.
    On CPU the cross-process collectives are gloo over TCP. When not all processes have
    connected within `init_timeout` seconds the process ends with a message and exit status
    `INIT_FAILED_EXIT`; other failures to start raise DistributedError, bad settings
    SettingsError.
    """
    found = settings(coordinator, num_processes, process_id, environ)
    if found is None:
        return False
    coordinator, num_processes, process_id = found
    if heartbeat_timeout < 1 or init_timeout < 1:
        raise SettingsError("the distributed timeouts must be at least 1 second")
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    # JAX aborts the process (a C++ fatal error, exit 134) when the others do not connect in
    # time; the watchdog below fires 10 s earlier with a message and a plain exit status.
    kwargs = dict(initialization_timeout=int(init_timeout) + 10,
                  heartbeat_timeout_seconds=int(heartbeat_timeout))
    if coordinator != "auto":
        kwargs["coordinator_address"] = coordinator
    if num_processes is not None:
        kwargs["num_processes"] = num_processes
    if process_id is not None:
        kwargs["process_id"] = process_id
    where = "cluster auto-detection" if coordinator == "auto" else coordinator
    advice = ("Start every process with the same --coordinator and --num-processes and its own "
              "--process-id (0..N-1), and check that process 0 is reachable at that address")
    who = (f"process {process_id} of {num_processes}" if process_id is not None
           else "this process")
    connected = threading.Event()

    def watchdog():
        if not connected.wait(init_timeout):
            _say(f"error: {who}: not all processes connected to the coordinator at {where} "
                 f"within {init_timeout} s (--init-timeout). {advice}.")
            os._exit(INIT_FAILED_EXIT)

    threading.Thread(target=watchdog, name="flaxcnn-init-watchdog", daemon=True).start()
    try:
        jax.distributed.initialize(**kwargs)
    except Exception as e:  # noqa: BLE001 - JAX raises several kinds; all mean "cannot start"
        raise DistributedError(
            f"could not start {who} with the coordinator at {where}: {_first_line(e)}. "
            f"{advice}"
        ) from e
    finally:
        connected.set()
    _state.update(process_id=jax.process_index(), num_processes=jax.process_count(),
                  active=True)
    return True


def active() -> bool:
    return _state["active"]


# Markers of a collective or coordination failure in JAX runtime errors.
_PEER_MARKERS = (
    "gloo", "connection reset", "connection closed", "connection refused", "broken pipe",
    "heartbeat", "coordination service", "unavailable:", "deadline_exceeded",
    "barrier", "socket closed", "failed to connect", "peer",
)


def is_peer_failure(exc: BaseException) -> bool:
    """Whether `exc` (from a jitted call or a checkpoint barrier) means a peer was lost."""
    if not active():
        return False
    text = f"{type(exc).__name__}: {exc}".lower()
    return any(marker in text for marker in _PEER_MARKERS)

