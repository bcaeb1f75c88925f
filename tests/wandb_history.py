"Read the history of an offline W&B run back from its `.wandb` file (a LevelDB-style log of protobuf records)."
import json, struct, time
from pathlib import Path
from wandb.proto import wandb_internal_pb2 as pb

BLOCK, HEADER = 32768, 7


def records(path):
    data = Path(path).read_bytes()
    assert data[:4] == b':W&B', f'{path} is not a W&B run file'
    pos, buf = HEADER, b''
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER: pos += left; continue  # block trailer padding
        _, n, kind = struct.unpack('<IHB', data[pos:pos+HEADER])
        if kind == 0: pos += left; continue  # zero-filled rest of a block
        if pos + HEADER + n > len(data): return  # a record still being written
        buf += data[pos+HEADER:pos+HEADER+n]; pos += HEADER + n
        if kind in (1, 4):  # a full record, or the last piece of one
            r = pb.Record(); r.ParseFromString(buf); buf = b''
            yield r


def finished_records(run_dir, timeout=60):
    "The records of the finished offline run in `run_dir` (the folder holding `run-<id>.wandb`), once its `exit` record is written"
    path, = Path(run_dir).glob('run-*.wandb')
    end = time.monotonic() + timeout
    while True:  # wandb's service may still be writing the file when `finish()` returns
        rs = list(records(path))
        if any(r.WhichOneof('record_type') == 'exit' for r in rs): return rs
        if time.monotonic() > end:
            raise TimeoutError(f'{path} has no exit record after {timeout} s: {[r.WhichOneof("record_type") for r in rs]}')
        time.sleep(0.1)


def _values(items):
    "W&B's key/value items as a dict of their (nested, dotted) keys and JSON values"
    return {'.'.join(i.nested_key) or i.key: json.loads(i.value_json) for i in items}


def history(run_dir):
    "Every history row of the finished offline run in `run_dir`, as dicts"
    return [_values(r.history.item) for r in finished_records(run_dir) if r.WhichOneof('record_type') == 'history']


def config(run_dir):
    "The config of the finished offline run in `run_dir`, as a dict of its keys and JSON values"
    out = {}
    for r in finished_records(run_dir):
        if r.WhichOneof('record_type') == 'config': out.update(_values(r.config.update))
        elif r.WhichOneof('record_type') == 'run': out.update(_values(r.run.config.update))
    return out


def summary(run_dir):
    "The run summary of the finished offline run in `run_dir`, as a dict of its keys and JSON values"
    out = {}
    for r in finished_records(run_dir):
        if r.WhichOneof('record_type') == 'summary': out.update(_values(r.summary.update))
    return out
