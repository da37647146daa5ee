"""The results table (markdown) and the plots (PNG) from results.json data."""

from pathlib import Path

from . import util

FILE, QSD = "nbdkit file", "qsd"
UNAVAILABLE = "not measured: server unavailable"

# key, title, unit, higher is better, anchor the target is relative to, factor
THROUGHPUT = [
    ("w1", "1. seq 1 MiB writes, first touch, open epoch", "MB/s", True, QSD, 2.0),
    ("w2a", "2. 4 KiB writes, first touch (one per cluster)", "IOPS", True, QSD, 1.0),
    ("w2b", "2. rand 4 KiB writes, re-touch", "IOPS", True, QSD, 1.0),
    ("w3a", "3. rand 4 KiB reads", "IOPS", True, QSD, 1.0),
    ("w3b", "3. seq 1 MiB reads", "MB/s", True, QSD, 1.0),
    ("w4", "4. seq 1 MiB writes, epoch 0 (no undo)", "MB/s", True, FILE, 0.9),
    ("w7", "7. QEMU mirror sync=full, time to READY", "s", False, FILE, 0.9),
]


def _med(vals):
    return util.median(vals) if vals else None


def _fmt(v, unit=""):
    if v is None:
        return "–"
    if unit == "IOPS":
        return f"{v:,.0f}"
    if unit in ("MB/s", "MiB"):
        return f"{v:,.0f}" if v >= 100 else f"{v:.1f}"
    if unit == "s":
        return f"{v:.2f}"
    if unit == "ms":
        return f"{v:.3f}" if v < 10 else f"{v:,.1f}"
    return f"{v:.3g}"


def _mc_labels(results):
    return [f"nbd-mc[{v['name']}]" for v in (results["meta"].get("nbd_mc") or [])]


def _best_mc(results, key, higher):
    """(label, median) of the best nbd-mc variant on workload `key`."""
    data = results["w"].get(key, {})
    cands = [(lab, _med(data.get(lab))) for lab in _mc_labels(results) if data.get(lab)]
    if not cands:
        return None, None
    return (max if higher else min)(cands, key=lambda c: c[1])


def _loss(p):
    """A loss figure, with its min-max over repetitions when there were several."""
    text = f"{p['loss'] * 100:.0f}%"
    if "loss_min" in p and p["loss_min"] != p["loss_max"]:
        text += f" ({p['loss_min'] * 100:.0f}–{p['loss_max'] * 100:.0f}%)"
    return text


def _verdict(ok):
    return "**met**" if ok else "**missed**"


def _mc_missing(results):
    if not results["meta"].get("nbd_mc_available"):
        return results["meta"].get("nbd_mc_reason", "server unavailable")
    return None


def rows(results):
    """Table rows: workload, metric, file, qsd, nbd-mc, ratio, target, result.

    Rows of workloads left out with --only are dropped.
    """
    only = results.get("only")
    return [r for r in _rows(results) if not only or int(r[0].split(".")[0]) in only]


def _rows(results):
    out = []
    missing = _mc_missing(results)
    not_measured = f"not measured: {missing}" if missing else None
    w = results["w"]

    for key, title, unit, higher, anchor, factor in THROUGHPUT:
        data = w.get(key, {})
        f, q = _med(data.get(FILE)), _med(data.get(QSD))
        qlabel = "qsd" if key not in ("w4", "w7") else "qsd (raw, no CBW)"
        tgt = f">= {factor:g}x {('nbdkit file' if anchor == FILE else 'qsd')}" + \
            (" speed" if unit == "s" else "")
        if not data and key == "w7" and results["meta"].get("w7_skipped"):
            out.append([title, unit, "–", "–", "not measured: " + results["meta"]["w7_skipped"],
                        "–", tgt, "not measured"])
            continue
        lab, m = _best_mc(results, key, higher)
        ref = f if anchor == FILE else q
        qcell = _fmt(q, unit) + ("" if qlabel == "qsd" else " ¹")
        if not_measured or m is None:
            out.append([title, unit, _fmt(f, unit), qcell,
                        not_measured or "error (see below)", "–", tgt, "not measured"])
            continue
        ratio = None
        if ref:
            ratio = (m / ref) if higher else (ref / m)
        res = _verdict(ratio is not None and ratio >= factor) if ratio is not None else "–"
        out.append([title, unit, _fmt(f, unit), qcell, f"{_fmt(m, unit)} ({lab[7:-1]})",
                    f"{ratio:.2f}x" if ratio else "–", tgt, res])

    # 5. commit latency
    lat = w.get("w5_latency", {})
    if not_measured or not lat:
        why = not_measured or "error (see below)"
        out.append(["5. commit latency, median / p99", "ms", "n/a", "n/a", why, "–",
                    "p99 <= 1 ms; 100k within 2x of 1k", "not measured"])
    else:
        lab = min(lat, key=lambda k: max(
            (util.percentile(s["lat"], 99) for s in lat[k].values()), default=1e9))
        series = lat[lab]
        p99s = {}
        for n in sorted(series, key=int):
            s = series[n]
            med = util.median(s["lat"]) * 1e3
            p99 = util.percentile(s["lat"], 99) * 1e3
            p99s[int(n)] = p99
            out.append([f"5. commit latency, {int(n):,} preserved clusters "
                        f"({len(s['lat'])} commits)", "ms", "n/a", "n/a",
                        f"{_fmt(med, 'ms')} / {_fmt(p99, 'ms')} ({lab[7:-1]})", "–",
                        "p99 <= 1 ms", _verdict(p99 <= 1.0)])
        if 1000 in p99s and 100000 in p99s:
            r = p99s[100000] / p99s[1000]
            out.append(["5. commit p99, 100k vs 1k preserved clusters", "ratio", "n/a", "n/a",
                        f"{r:.2f}x", "–", "<= 2x", _verdict(r <= 2.0)])
    sus = w.get("w5_sustained", {})
    if not_measured or not sus:
        out.append(["5. commits/s sustained during workload 2", "1/s", "n/a", "n/a",
                    not_measured or "error (see below)", "–",
                    ">= 100/s with <= 10% loss", "not measured"])
    else:
        lab = max(sus, key=lambda k: (sus[k]["paced"]["rate"], -sus[k]["paced"]["loss"]))
        s = sus[lab]
        p, mx = s["paced"], s["max"]
        out.append([f"5. commits/s paced at 100/s during rand 4 KiB writes "
                    f"(baseline {s['baseline_iops']:,.0f} IOPS)", "1/s, loss", "n/a", "n/a",
                    f"{p['rate']:.0f}/s, {_loss(p)} loss, p99 "
                    f"{p['lat_p99'] * 1e3:.2f} ms ({lab[7:-1]})" if p["lat_p99"] else
                    f"{p['rate']:.0f}/s", "–", ">= 100/s with <= 10% loss",
                    _verdict(p["rate"] >= 99.0 and p["loss"] <= 0.10)])
        ft = _med(w.get("w2a", {}).get(lab))
        if ft:
            out.append(["5. IOPS with 100 commits/s vs 4 KiB first-touch IOPS (workload 2)",
                        "ratio", "n/a", "n/a", f"{p['iops'] / ft:.2f}x ({lab[7:-1]})", "–",
                        "(information: commit cost beyond first touches)", "–"])
        out.append(["5. commits/s back to back during rand 4 KiB writes", "1/s, loss", "n/a",
                    "n/a", f"{mx['rate']:.0f}/s, {_loss(mx)} loss ({lab[7:-1]})",
                    "–", "(information)", "–"])

    # 6. failover
    fo = w.get("w6", {})
    qsd_fo = {e["undo"]: e["seconds"] for e in fo.get("qsd", [])}
    mc_fo = {k: v for k, v in fo.items() if k != "qsd"}
    if not_measured or not mc_fo:
        for mode in ("in place", "instant"):
            out.append([f"6. failover {mode}", "ms", "n/a",
                        "qemu-img commit: " + ", ".join(
                            f"{util.human_size(u) if u else '0'}: {s * 1e3:,.0f}"
                            for u, s in sorted(qsd_fo.items())) if mode == "in place" and
                        qsd_fo else "n/a",
                        not_measured or "error (see below)", "–",
                        "<= 100 ms" if mode == "instant" else "(against undo size)",
                        "not measured"])
    else:
        lab = sorted(mc_fo)[0]
        entries = mc_fo[lab]
        for mode in ("in place", "instant"):
            es = sorted((e for e in entries if e["mode"] == mode), key=lambda e: e["undo"])
            for e in es:
                u = e["undo"]
                q = qsd_fo.get(u)
                ok = "–"
                tgt = "(information)"
                if mode == "instant":
                    tgt = "<= 100 ms"
                    ok = _verdict(e["seconds"] <= 0.100)
                out.append([f"6. failover {mode}, {util.human_size(u) if u else '0'} undo data",
                            "ms", "n/a",
                            (f"{q * 1e3:,.0f} (qemu-img commit)" if q is not None and
                             mode == "in place" else "n/a"),
                            f"{e['seconds'] * 1e3:,.1f} ({lab[7:-1]})",
                            (f"{q / e['seconds']:.2f}x" if q and mode == "in place" else "–"),
                            tgt, ok])

    # 8. memory
    data = w.get("w8", {})
    lab, m = _best_mc(results, "w8", higher=False)
    tgt = "<= 64 MiB"
    f, q = _med(data.get(FILE)), _med(data.get(QSD))
    if not_measured or m is None:
        out.append(["8. peak RSS serving a 1 TiB sparse image", "MiB", _fmt(f, "MiB"),
                    _fmt(q, "MiB"), not_measured or "error (see below)", "–", tgt,
                    "not measured"])
    else:
        out.append(["8. peak RSS serving a 1 TiB sparse image", "MiB", _fmt(f, "MiB"),
                    _fmt(q, "MiB"), f"{_fmt(m, 'MiB')} ({lab[7:-1]})", "–", tgt,
                    _verdict(m <= 64)])
    return out



# ---------------------------------------------------------------- verdicts

def _paired(a, b, fn):
    """fn(a_i, b_i) for repetitions measured together (same index or same "rep")."""
    if a and b and isinstance(a[0], dict):
        bb = {e["rep"]: e for e in b}
        return [fn(e, bb[e["rep"]]) for e in a if e["rep"] in bb]
    if a and b and len(a) == len(b):
        return [fn(x, y) for x, y in zip(a, b)]
    return []


def _spread(vals):
    vals = [v for v in vals if v is not None]
    if not vals:
        return None
    return {"median": util.median(vals), "min": min(vals), "max": max(vals), "n": len(vals)}


def _verdict_row(target, spread, limit, higher, unit="x"):
    """One verdict: decided by the median over repetitions; "marginal" when the
    spread (min-max) reaches across the limit, so another run could flip it."""
    if spread is None:
        return {"target": target, "result": "not measured"}
    ok = spread["median"] >= limit if higher else spread["median"] <= limit
    both = [spread["min"], spread["max"]]
    settled = all((v >= limit) == ok if higher else (v <= limit) == ok for v in both)
    return {"target": target, "result": "met" if ok else "missed", "settled": settled,
            "unit": unit, **spread}


GUEST_GOALS = [  # (job key, metric, limit, higher is better, title)
    ("w9 qd1 4k", "p50_us", 1.2, False, "9. QD1 4 KiB write p50 through the mirror <= 1.2x nbdkit file"),
    ("w9 qd1 4k", "p99_us", 1.3, False, "9. QD1 4 KiB write p99 through the mirror <= 1.3x nbdkit file"),
    ("w9 qd16 4k", "iops", 0.95, True, "9. QD16 4 KiB write IOPS through the mirror >= 0.95x nbdkit file"),
]
WA_LIMIT = 2.0


def verdicts(results):
    """Every target of the run: met/missed, the ratio (median over repetitions of
    ratios taken within one repetition) and its spread."""
    w = results["w"]
    out = []
    only = results.get("only")

    def wanted(n):
        return not only or n in only

    for key, title, unit, higher, anchor, factor in THROUGHPUT:
        n = int(title.split(".")[0])
        if not wanted(n):
            continue
        data = w.get(key, {})
        lab, _ = _best_mc(results, key, higher)
        ref = data.get(anchor)
        sp = None
        if lab and ref:
            sp = _spread(_paired(data[lab], ref,
                                 (lambda m, r: m / r) if higher else (lambda m, r: r / m)))
        tname = "nbdkit file" if anchor == FILE else "qsd"
        out.append(_verdict_row(f"{title} >= {factor:g}x {tname}"
                                + (" speed" if unit == "s" else ""), sp, factor, True))
    if wanted(5):
        lat = w.get("w5_latency", {})
        for lab, series in lat.items():
            for n in sorted(series, key=int):
                ms = [v * 1e3 for v in series[n]["lat"]]
                p99 = util.percentile(ms, 99)
                fl = [v * 1e3 for v in series[n].get("floor", [])]
                out.append({"target": f"5. commit p99 <= 1 ms, {int(n):,} preserved clusters "
                                      f"({lab})",
                            "result": "met" if p99 <= 1.0 else "missed", "settled": True,
                            "text": f"p99 {p99:.2f} ms (median {util.median(ms):.2f}, "
                                    f"n={len(ms)})" + (
                                        f"; floor (no-op request) p99 "
                                        f"{util.percentile(fl, 99):.2f} ms" if fl else "")})
        sus = w.get("w5_sustained", {})
        for lab, s in sus.items():
            p = s["paced"]
            ok = p["rate"] >= 99.0 and p["loss"] <= 0.10
            out.append({"target": f"5. 100 commits/s with <= 10% IOPS loss ({lab})",
                        "result": "met" if ok else "missed", "settled": True, "unit": "",
                        "text": f"{p['rate']:.0f}/s, {_loss(p)} loss, commit p99 "
                                f"{(p['lat_p99'] or 0) * 1e3:.2f} ms"})
    if wanted(9):
        for key, metric, limit, higher, title in GUEST_GOALS:
            data = w.get(key, {})
            labs = [l for l in _mc_labels(results) if data.get(l)]
            sp = None
            if labs and data.get(FILE):
                sp = _spread(_paired(data[labs[0]], data[FILE],
                                     lambda m, r: m[metric] / r[metric]))
            out.append(_verdict_row(title, sp, limit, higher))
    if wanted(10):
        data = w.get("w10", {})
        labs = [l for l in _mc_labels(results) if data.get(l)]
        sp = _spread([e["wa"] for e in data[labs[0]]]) if labs else None
        out.append(_verdict_row(f"10. write amplification <= {WA_LIMIT:g}x, 4 KiB random "
                                "writes, 100 ms epochs", sp, WA_LIMIT, False))
    return out


def verdict_lines(results):
    lines = []
    for v in verdicts(results):
        if v["result"] == "not measured":
            lines.append(f"NOT MEASURED  {v['target']}")
            continue
        if "text" in v:
            fig = v["text"]
        else:
            u = v["unit"]
            fig = (f"{v['median']:.2f}{u} (min-max {v['min']:.2f}-{v['max']:.2f}{u}, "
                   f"n={v['n']})")
        tail = "" if v["settled"] else "  [marginal: the spread crosses the target]"
        lines.append(f"{v['result'].upper():<7} {v['target']}: {fig}{tail}")
    return lines


def guest_table(results):
    """Workload 9: medians (min-max) of every target for every job."""
    w = results["w"]
    keys = [k for k in w if k.startswith("w9 ")]
    if not keys:
        return ""
    labs = [l for l in [FILE, QSD] + _mc_labels(results) if any(w[k].get(l) for k in keys)]
    body = []
    for key in keys:
        data = w[key]
        for metric, unit in (("p50_us", "µs"), ("p99_us", "µs"), ("iops", "IOPS")):
            cells = []
            for l in labs:
                v = [e[metric] for e in data.get(l, [])]
                if not v:
                    cells.append("–")
                    continue
                f = (lambda x: f"{x:,.0f}")
                cells.append(f"{f(util.median(v))} ({f(min(v))}–{f(max(v))})")
            ratios = []
            for l in labs[1:]:
                sp = _spread(_paired(data.get(l, []), data.get(FILE, []),
                                     lambda m, r: m[metric] / r[metric]))
                ratios.append(f"{sp['median']:.2f}x ({sp['min']:.2f}–{sp['max']:.2f})"
                              if sp else "–")
            qd, bs = key.split()[1:]
            body.append([f"rand {bs} write {qd.upper()}", f"{metric.split('_')[0]} {unit}"]
                        + cells + ratios)
    head = ["fio on the primary", "metric"] + [f"target: {l}" for l in labs] + \
        [f"{l} / file" for l in labs[1:]]
    return _table(head, body)


def wa_table(results):
    data = results["w"].get("w10", {})
    if not data:
        return ""
    body = []
    for lab, es in data.items():
        if lab.startswith("_"):
            continue
        wa = _spread([e["wa"] for e in es])
        wb = _spread([e["wa_write_bytes"] for e in es])
        body.append([lab, f"{util.median([e['iops'] for e in es]):,.0f}",
                     f"{wa['median']:.2f}x ({wa['min']:.2f}–{wa['max']:.2f})",
                     f"{wb['median']:.2f}x", f"{util.median([e['commits'] for e in es]):.0f}"])
    return _table(["server", "IOPS (QD1)", "bytes written / client byte (wchar)",
                   "(write_bytes, page-cache accounting)", "commits"], body)


def _table(header, body):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in body]
    return "\n".join(lines) + "\n"


def variant_table(results):
    labels = _mc_labels(results)
    if not labels:
        return ""
    body = []
    for key, title, unit, *_ in THROUGHPUT + [("w8", "8. peak RSS, 1 TiB sparse", "MiB")]:
        data = results["w"].get(key, {})
        if not any(data.get(l) for l in labels):
            continue
        cells = []
        for l in labels:
            v = data.get(l)
            if not v:
                cells.append("–")
            elif len(v) > 1:
                cells.append(f"{_fmt(_med(v), unit)} ({_fmt(min(v), unit)}–{_fmt(max(v), unit)})")
            else:
                cells.append(_fmt(v[0], unit))
        anchors = []
        for a in (FILE, QSD):
            v = data.get(a)
            anchors.append(_fmt(_med(v), unit) if v else "–")
        body.append([title, unit] + anchors + cells)
    return _table(["workload", "unit", FILE, QSD] + labels, body)


def markdown(results):
    meta, cfg = results["meta"], results["config"]
    mode = "FULL" if cfg.get("full") else "quick"
    out = [f"# nbd-mc benchmark ({mode} run, {meta.get('started')})\n"]
    out.append(
        f"All figures measured side by side in this run on {meta.get('cpus')} CPUs; "
        f"{'median of %d repetitions, ' % cfg['reps'] if cfg.get('reps', 1) > 1 else ''}"
        f"image {util.human_size(cfg['image_size'])} (fully allocated, fresh copy per "
        f"server), fio nbd engine, iodepth 16, time-based runs {cfg['runtime']} s. "
        f"nbd-mc: best of its thread models (in parentheses). "
        f"Load average at start {meta.get('loadavg_start')}, during "
        f"{meta.get('loadavg_during')}: the machine is shared, so absolute numbers "
        f"are noisy; the ratios are what count.\n")
    header = ["workload", "unit", FILE, "qsd (CBW)", "nbd-mc", "ratio", "target", "result"]
    out.append(_table(header, rows(results)))
    out.append("¹ workloads 4 and 7 are epoch 0 (no undo): qsd exports the raw node "
               "without the copy-before-write filter.\n")
    gt = guest_table(results)
    if gt:
        out.append(f"\n## 9. What the guest feels: fio on a primary qemu-storage-daemon, "
                   f"mirrored write-blocking onto each target\n\n"
                   f"Median (min–max) over {cfg.get('guest_reps')} repetitions of "
                   f"{cfg.get('guest_runtime')} s random writes on a "
                   f"{util.human_size(cfg.get('guest_size') or 0)} disk; the targets take turns "
                   f"job by job; nbd-mc commits every {1000 // (cfg.get('epoch_rate') or 10)} ms "
                   f"(qsd keeps one epoch); ratios are taken within a repetition.\n\n" + gt)
    wt = wa_table(results)
    if wt:
        out.append(f"\n## 10. Write amplification on the secondary\n\n"
                   f"Bytes the server process wrote (/proc/PID/io `wchar`: every write "
                   f"syscall, image + undo + metadata + state) per byte fio wrote: random "
                   f"4 KiB writes, QD1, {cfg.get('wa_runtime')} s from a fresh epoch, nbd-mc "
                   f"committing every {1000 // (cfg.get('epoch_rate') or 10)} ms; qsd keeps one "
                   f"epoch (its later writes are re-touches).  `write_bytes` counts whole "
                   f"page-cache folios when they are dirtied, so it over-counts small "
                   f"writes (even nbdkit file shows > 1x): information only.\n\n" + wt)
    vt = variant_table(results)
    if vt:
        out.append("\n## nbd-mc per thread model\n\n" + vt)
        out.append("\nvariants: " + "; ".join(
            f"`{v['name']}` = `{' '.join(v['args']) or '(defaults)'}`"
            for v in meta.get("nbd_mc") or []) + "\n")
    lat = results["w"].get("w5_latency", {})
    if lat:
        out.append("\n## Commit latency detail (client round trip; server-reported)\n\n")
        body = []
        for lab, series in lat.items():
            for n in sorted(series, key=int):
                s = series[n]
                ss = s.get("server_seconds") or []
                body.append([lab, f"{int(n):,}", len(s["lat"]),
                             _fmt(util.median(s["lat"]) * 1e3, "ms"),
                             _fmt(util.percentile(s["lat"], 99) * 1e3, "ms"),
                             _fmt(max(s["lat"]) * 1e3, "ms"),
                             _fmt(util.median(ss) * 1e3, "ms") if ss else "–",
                             _fmt(util.percentile(ss, 99) * 1e3, "ms") if ss else "–",
                             _fmt(util.median(s["floor"]) * 1e3, "ms") if s.get("floor") else "–",
                             _fmt(util.percentile(s["floor"], 99) * 1e3, "ms")
                             if s.get("floor") else "–"])
        out.append(_table(["server", "preserved clusters", "commits", "median ms", "p99 ms",
                           "max ms", "server median ms", "server p99 ms",
                           "floor median ms", "floor p99 ms"], body))
        out.append("\nFloor: the same `commit` request for the already committed epoch, "
                   "sent right after each commit on the same connection; the server answers "
                   "it without any work, so it is what the control channel and this "
                   "machine's scheduling cost by themselves.\n")
        out.append(f"\nCluster size {util.human_size(cfg['commit_cluster'])} for this series "
                   "(so 100k preserved clusters fit the image); the clusters of each "
                   "commit are one contiguous run written with 1 MiB writes.\n")
    sus = results["w"].get("w5_sustained", {})
    if sus:
        body = []
        for lab, s in sus.items():
            for mode in ("paced", "max"):
                p = s[mode]
                body.append([lab, mode, f"{s['baseline_iops']:,.0f}", f"{p['iops']:,.0f}",
                             _loss(p), p["commits"], f"{p['rate']:.1f}",
                             _fmt((p["lat_p50"] or 0) * 1e3, "ms"),
                             _fmt((p["lat_p99"] or 0) * 1e3, "ms"), p["errors"]])
        out.append("\n## Commits during random 4 KiB writes\n\n")
        out.append(_table(["server", "mode", "baseline IOPS", "IOPS", "loss", "commits",
                           "commits/s", "commit p50 ms", "commit p99 ms", "errors"], body))
        out.append("\nBaseline: the same time-based fio job (random 4 KiB writes over the "
                   "whole image) with no commit, started in a fresh epoch: first touches, "
                   "then more and more re-touches. With commits every epoch starts over "
                   "with first touches, so the loss includes their cost; the ratio to "
                   "workload 2's first-touch IOPS in the main table isolates the commits.\n")
    det = meta.get("w8_detail")
    if det:
        names = list(next(iter(det.values()))["phases"])
        body = [[lab] + [f"{d['phases'][n]['rss_mib']:.1f} / {d['phases'][n]['peak_mib']:.1f}"
                         for n in names] for lab, d in det.items()]
        out.append(f"\n## Memory serving a 1 TiB sparse image "
                   f"({cfg.get('tib_touches'):,} first-touch 4 KiB writes spread over it, "
                   f"random reads, 256 MiB sequential read)\n\n")
        out.append(_table(["server"] + [f"after {n}: RSS / peak MiB" for n in names], body))
    w15 = meta.get("w15")
    if w15:
        from .asynclink import markdown as async_table
        out.append("\n## Across a slow link: unprotected, sync, async (workload 15)\n\n"
                   "Guest 4 KiB QD1 writes (HMP qemu-io, QEMU's own latency figure), the "
                   "secondary behind the link emulator; pause and lag from protect's "
                   "--json (bench/asynclink.py).\n\n" + async_table(w15))
    checks = meta.get("preserved_check")
    if checks:
        bad = {k: v for k, v in checks.items() if v["expected"] != v["preserved_clusters"]}
        out.append("\nFirst-touch check (nbd-mc's preserved_clusters after the workload): "
                   + ("all as expected.\n" if not bad else
                      "; ".join(f"{k}: {v['preserved_clusters']} of {v['expected']}"
                                for k, v in bad.items()) + "\n"))
    w14 = meta.get("w14")
    if w14:
        from .replicas import summary as replicas_summary
        out.append(f"\n## Many replicas on one host (workload 14: 4 KiB random writes, "
                   f"QD{w14['qd']} per server, nbd-mc committed every "
                   f"{w14['epoch_s'] * 1000:.0f} ms)\n\n" + "\n".join(replicas_summary(w14)) + "\n")
    vl = verdict_lines(results)
    if vl:
        out.append("\n## Verdicts\n\nEach target decided in this run: the median over "
                   "repetitions of the ratio taken within one repetition (min-max in "
                   "parentheses); *marginal* when the spread reaches across the target.\n\n"
                   + "".join(f"    {l}\n" for l in vl))
    errs = results.get("errors")
    if errs:
        out.append("\n## Errors\n\n" + "".join(f"- {e}\n" for e in errs))
    v = meta.get("versions", {})
    out.append(f"\n{v.get('fio')}; {v.get('nbdkit')}; {v.get('qemu')}; run took "
               f"{meta.get('seconds', 0):.0f} s.\n")
    return "\n".join(x if x.endswith("\n") else x + "\n" for x in out)


# ---------------------------------------------------------------- plots

def plots(results, outdir):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker  # noqa: F401 - used as matplotlib.ticker
    except ImportError:
        return []
    outdir = Path(outdir)
    made = []
    w = results["w"]
    labels = [FILE, QSD] + _mc_labels(results)
    colors = {FILE: "#888888", QSD: "#4477aa"}
    palette = ["#ee6677", "#228833", "#ccbb44", "#aa3377"]
    for i, l in enumerate(_mc_labels(results)):
        colors[l] = palette[i % len(palette)]

    keys = [k for k in THROUGHPUT if w.get(k[0])]
    if keys:
        n = len(keys)
        cols = 4
        rows_ = (n + cols - 1) // cols
        fig, axes = plt.subplots(rows_, cols, figsize=(4 * cols, 3.4 * rows_), squeeze=False)
        for ax in axes.flat[n:]:
            ax.axis("off")
        for ax, (key, title, unit, higher, anchor, factor) in zip(axes.flat, keys):
            labs = [l for l in labels if w[key].get(l)]
            vals = [_med(w[key][l]) for l in labs]
            ax.bar(range(len(labs)), vals, color=[colors[l] for l in labs])
            ax.set_xticks(range(len(labs)))
            ax.set_xticklabels([l.replace("nbd-mc", "mc") for l in labs], rotation=30,
                               ha="right", fontsize=8)
            ref = _med(w[key].get(anchor))
            if ref:
                tv = ref * factor if higher else ref / factor
                ax.axhline(tv, color="k", ls="--", lw=1, label="target")
                ax.legend(fontsize=7)
            ax.set_title(title, fontsize=8)
            ax.set_ylabel(unit + (" (lower is better)" if not higher else ""), fontsize=8)
        fig.tight_layout()
        p = outdir / "throughput.png"
        fig.savefig(p, dpi=90)
        plt.close(fig)
        made.append(p)

    lat = w.get("w5_latency", {})
    if lat:
        fig, ax = plt.subplots(figsize=(6, 4))
        for lab, series in lat.items():
            ns = sorted(series, key=int)
            xs = [int(n) for n in ns]
            ax.plot(xs, [util.median(series[n]["lat"]) * 1e3 for n in ns], "o-",
                    color=colors.get(lab), label=f"{lab} median")
            ax.plot(xs, [util.percentile(series[n]["lat"], 99) * 1e3 for n in ns], "s--",
                    color=colors.get(lab), label=f"{lab} p99")
        ax.axhline(1.0, color="k", ls=":", lw=1, label="1 ms target")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1, 2, 5)))
        ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("preserved clusters at commit")
        ax.set_ylabel("commit latency (ms)")
        ax.legend(fontsize=7)
        ax.set_title("5. commit latency")
        fig.tight_layout()
        p = outdir / "commit_latency.png"
        fig.savefig(p, dpi=90)
        plt.close(fig)
        made.append(p)

    fo = w.get("w6", {})
    if fo:
        fig, ax = plt.subplots(figsize=(6, 4))
        for lab, entries in fo.items():
            modes = sorted({e["mode"] for e in entries})
            for mode in modes:
                es = sorted((e for e in entries if e["mode"] == mode), key=lambda e: e["undo"])
                ax.plot([e["undo"] / MiB for e in es], [e["seconds"] * 1e3 for e in es], "o-",
                        label=f"{lab} {mode}",
                        color=colors.get(lab) if mode != "instant" else "#66ccee")
        ax.axhline(100, color="k", ls=":", lw=1, label="100 ms (instant target)")
        ax.set_xlabel("undo data (MiB)")
        ax.set_ylabel("failover time (ms)")
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.legend(fontsize=7)
        ax.set_title("6. failover time against undo data")
        fig.tight_layout()
        p = outdir / "failover.png"
        fig.savefig(p, dpi=90)
        plt.close(fig)
        made.append(p)

    gkeys = [k for k in w if k.startswith("w9 ")]
    if gkeys:
        labs = [l for l in labels if any(w[k].get(l) for k in gkeys)]
        panels = [("p50_us", "p50 latency (µs)"), ("p99_us", "p99 latency (µs)"),
                  ("iops", "IOPS")]
        fig, axes = plt.subplots(1, 3, figsize=(15, 4))
        width = 0.8 / max(1, len(labs))
        for ax, (metric, ylabel) in zip(axes, panels):
            for i, l in enumerate(labs):
                meds, lo, hi = [], [], []
                for k in gkeys:
                    v = [e[metric] for e in w[k].get(l, [])] or [0]
                    m = util.median(v)
                    meds.append(m)
                    lo.append(m - min(v))
                    hi.append(max(v) - m)
                xs = [j + (i - (len(labs) - 1) / 2) * width for j in range(len(gkeys))]
                ax.bar(xs, meds, width, yerr=[lo, hi], capsize=2, color=colors.get(l),
                       label=l)
            ax.set_xticks(range(len(gkeys)))
            ax.set_xticklabels([k[3:].replace("qd", "QD") for k in gkeys], fontsize=8)
            ax.set_ylabel(ylabel)
            if metric != "iops":
                ax.set_yscale("log")
                ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        axes[0].legend(fontsize=7)
        fig.suptitle("9. fio random writes on the primary, mirrored write-blocking onto "
                     "each target (median, bars min-max)", fontsize=9)
        fig.tight_layout()
        p = outdir / "guest_latency.png"
        fig.savefig(p, dpi=90)
        plt.close(fig)
        made.append(p)

    wa = {l: v for l, v in w.get("w10", {}).items() if not l.startswith("_")}
    if wa:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        labs = list(wa)
        meds = [util.median([e["wa"] for e in wa[l]]) for l in labs]
        ax.bar(range(len(labs)), meds, color=[colors.get(l, "#aa3377") for l in labs])
        for i, m in enumerate(meds):
            ax.text(i, m, f"{m:.1f}x", ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(labs)))
        ax.set_xticklabels(labs, rotation=20, ha="right", fontsize=8)
        ax.axhline(WA_LIMIT, color="k", ls="--", lw=1, label=f"{WA_LIMIT:g}x target")
        ax.set_ylabel("server bytes written per client byte")
        ax.set_title("10. write amplification, 4 KiB random writes, 100 ms epochs", fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        p = outdir / "write_amplification.png"
        fig.savefig(p, dpi=90)
        plt.close(fig)
        made.append(p)

    if w.get("w8"):
        fig, ax = plt.subplots(figsize=(6, 3.5))
        labs = [l for l in labels if w["w8"].get(l)]
        ax.bar(range(len(labs)), [_med(w["w8"][l]) for l in labs],
               color=[colors[l] for l in labs])
        ax.set_xticks(range(len(labs)))
        ax.set_xticklabels(labs, rotation=20, ha="right", fontsize=8)
        ax.axhline(64, color="k", ls="--", lw=1, label="64 MiB target")
        ax.set_ylabel("peak RSS (MiB)")
        ax.set_title("8. peak RSS serving a 1 TiB sparse image")
        ax.legend(fontsize=7)
        fig.tight_layout()
        p = outdir / "memory.png"
        fig.savefig(p, dpi=90)
        plt.close(fig)
        made.append(p)
    return made


MiB = util.MiB
