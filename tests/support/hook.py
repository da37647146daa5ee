"""The checkpoint hook the protect tests give `nbd-mc protect --checkpoint-hook`.

Run while the VM is stopped and every mirror drained: under the played guest's
lock (so no guest request is half done), it copies every primary image into
``records/EPOCH`` -- the exact disk the secondary must show once EPOCH is
committed -- and keeps the last three.  ``fail_once_at`` makes it fail once at
that epoch (the commit is then skipped).  Its configuration is a JSON file:
lock, paused, records, images {disk: path}, and optionally fail_once_at and
failed_marker.
"""

RECORDING_HOOK = r'''
import fcntl, json, os, shutil, sys
cfg = json.load(open(sys.argv[1]))
epoch = int(os.environ["NBD_MC_EPOCH"])
if cfg.get("fail_once_at") == epoch and not os.path.exists(cfg["failed_marker"]):
    open(cfg["failed_marker"], "w").close()
    sys.exit(3)
with open(cfg["lock"], "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)   # a guest request in progress finishes first
    with open(cfg["paused"], "w") as f:  # ... and no new one starts until cont
        f.write(str(epoch))
    final = os.path.join(cfg["records"], str(epoch))
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    for drive, path in cfg["images"].items():
        shutil.copyfile(path, os.path.join(tmp, drive))
    shutil.rmtree(final, ignore_errors=True)
    os.rename(tmp, final)
    shutil.rmtree(os.path.join(cfg["records"], str(epoch - 3)), ignore_errors=True)
'''
