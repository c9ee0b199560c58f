"""A small local page for one finished run: paste a prompt and two replies, see how the run scores them.

    python run.py serve --run runs/x            # http://127.0.0.1:8000/

The page shows the ensemble's probabilities as bars and its verdict, the ensemble on each A/B order
alone, and per stage its own probabilities, both orders before swap TTA, its share in the ensemble and
(deep stages) what truncation kept: :func:`pipeline.explain.explain`, the same as ``run.py score``.
``POST /api/score`` with a JSON object ``{"prompt", "response_a", "response_b"}`` answers the same as
JSON (:meth:`pipeline.explain.Explanation.as_dict`).

Built on Flask (served by Werkzeug's threaded server). It listens on the loopback address unless told
otherwise (``--host``; anything else is logged as a warning: the page has no authentication); a request
body is bounded (``max_bytes``, HTTP 413 beyond); one scoring job runs at a time (a second request while
one runs gets HTTP 503 with a message to retry); bad input (a missing or empty field, a body that is not
JSON) is HTTP 400 with a one-line message. Nothing is written to disk.
"""
from __future__ import annotations

import ipaddress
import logging
import threading

from flask import Flask, jsonify, render_template_string, request

from kernel.errors import UserError
from pipeline.explain import CLASSES, VERDICTS, Explanation, explain, pair_battle
from pipeline.predict import Predictor

log = logging.getLogger(__name__)

DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 8000
DEFAULT_MAX_BYTES = 1 << 20  # 1 MiB per request: a long conversation is a few hundred kB
FIELDS = (("prompt", "Prompt"), ("response_a", "Response A"), ("response_b", "Response B"))
BUSY = "busy: another pair is being scored (one job at a time); try again in a moment"

PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>arena-stack: {{ run }}</title>
<style>
body{font-family:system-ui,sans-serif;max-width:1100px;margin:1.5em auto;padding:0 1em;color:#222}
textarea{width:100%;box-sizing:border-box;font:inherit;font-size:.92em}label{font-weight:600}
.cols{display:flex;gap:1em}.cols>div{flex:1}button{font-size:1em;padding:.4em 1.4em;margin:.6em 0}
.error{border:2px solid #b00;background:#fee;padding:.5em 1em}.verdict{font-size:1.3em}
.bar{display:flex;align-items:center;gap:.6em;margin:.25em 0}.bar .name{width:6.5em}
.bar .track{flex:1;background:#eee;height:1.3em;border-radius:3px}.bar .fill{height:100%;border-radius:3px}
.fill.a{background:#3a7bd5}.fill.b{background:#e0843a}.fill.tie{background:#888}.bar .value{width:4.5em;text-align:right}
table{border-collapse:collapse;margin:.6em 0 1.2em;font-size:.9em}th,td{border:1px solid #ccc;padding:.25em .6em;text-align:right}
th{background:#f3f3f3;text-align:center}td:first-child,td.kept{text-align:left}.note{color:#555;font-size:.9em}
.share{display:inline-block;background:#5a9;height:.8em;vertical-align:middle}
</style></head><body>
<h1>Which reply would a person prefer?</h1>
<p class="note">Run <code>{{ run }}</code>, ensemble <b>{{ chosen }}</b> over {{ stages|join(", ") }}.</p>
{% if error %}<p class="error" id="error">{{ error }}</p>{% endif %}
<form method="post" action="/">
<label for="prompt">Prompt</label>
<textarea id="prompt" name="prompt" rows="3">{{ form.prompt }}</textarea>
<div class="cols">
<div><label for="response_a">Response A</label><textarea id="response_a" name="response_a" rows="7">{{ form.response_a }}</textarea></div>
<div><label for="response_b">Response B</label><textarea id="response_b" name="response_b" rows="7">{{ form.response_b }}</textarea></div>
</div>
<button type="submit" id="score">Score</button>
</form>
{% if e %}
<h2>Result</h2>
<p class="verdict" id="verdict">Verdict: <b>{{ e.verdict }}</b></p>
{% for c in classes %}
<div class="bar"><span class="name">{{ verdicts[loop.index0] }}</span>
<span class="track"><span class="fill {{ c }}" style="display:block;width:{{ '%.1f' % (100 * e.probs[loop.index0]) }}%"></span></span>
<span class="value" id="p-{{ c }}">{{ '%.4f' % e.probs[loop.index0] }}</span></div>
{% endfor %}
<h3>Both A/B orders</h3>
<p class="note">Each stage scores the pair as given (A/B) and with A and B exchanged (B/A, shown realigned so the
first column is always response A); its answer is the average of the two. "Ensemble" rows are the ensemble on one
order alone.</p>
<table id="orders"><thead><tr><th>output</th><th>order</th><th>P(A wins)</th><th>P(B wins)</th><th>P(tie)</th></tr></thead><tbody>
{% if e.orders %}{% for name, p in [("A/B", e.orders[0]), ("B/A", e.orders[1])] %}
<tr><td>ensemble</td><td>{{ name }}</td>{% for v in p %}<td>{{ '%.4f' % v }}</td>{% endfor %}</tr>{% endfor %}{% endif %}
{% for s in e.stages %}{% if s.orders %}{% for name, p in [("A/B", s.orders[0]), ("B/A", s.orders[1])] %}
<tr><td>{{ s.name }}</td><td>{{ name }}</td>{% for v in p %}<td>{{ '%.4f' % v }}</td>{% endfor %}</tr>{% endfor %}{% endif %}{% endfor %}
</tbody></table>
<h3>Stages</h3>
<table id="stages"><thead><tr><th>stage</th><th>type</th><th>share in the ensemble</th><th>P(A wins)</th><th>P(B wins)</th><th>P(tie)</th><th>kept (tokens; turns dropped)</th></tr></thead><tbody>
{% for s in e.stages %}<tr><td>{{ s.name }}</td><td>{{ s.type }}</td>
<td><span class="share" style="width:{{ '%.0f' % (60 * s.share) }}px"></span> {{ '%.1f' % (100 * s.share) }}%</td>
{% for v in s.probs %}<td>{{ '%.4f' % v }}</td>{% endfor %}
<td class="kept">{% if s.truncation %}{% for f in ["prompt", "response_a", "response_b"] %}{{ f }} {{ s.truncation.tokens[f] }}{% if s.truncation.cut[f] %} (cut){% endif %}{% if s.truncation.turns_dropped[f] %}, {{ s.truncation.turns_dropped[f] }} turns dropped{% endif %}{% if not loop.last %}; {% endif %}{% endfor %}{% else %}-{% endif %}</td></tr>
{% endfor %}</tbody></table>
<p class="note">A stage's probabilities are its own (softmax of its logits); the ensemble's calibrator combines them
by the shares above.</p>
{% endif %}
</body></html>"""


def create_app(predictor: Predictor, max_bytes: int = DEFAULT_MAX_BYTES) -> Flask:
    """The page's Flask app over a loaded predictor (tests use its ``test_client``)."""
    app = Flask(__name__)
    app.config.update(MAX_CONTENT_LENGTH=max_bytes, MAX_FORM_MEMORY_SIZE=max_bytes)
    lock = threading.Lock()
    app.extensions["arena_score_lock"] = lock  # one job at a time
    about = {"run": str(predictor.run), "chosen": predictor.ensemble.chosen, "stages": predictor.stage_names,
             "classes": CLASSES, "verdicts": VERDICTS}

    def page(form, e: Explanation | None = None, error: str | None = None, status: int = 200):
        return render_template_string(PAGE, form=form, e=e, error=error, **about), status

    def score(fields: dict) -> Explanation:
        missing = [name for name, _ in FIELDS if not isinstance(fields.get(name), str)]
        if missing:
            raise UserError(f"missing field(s) {missing}: send prompt, response_a and response_b as text")
        battle = pair_battle(fields["prompt"], fields["response_a"], fields["response_b"])
        if not lock.acquire(blocking=False):
            raise _Busy(BUSY)
        try:
            [e] = explain(predictor, battle)
        finally:
            lock.release()
        return e

    @app.get("/")
    def index():
        return page({name: "" for name, _ in FIELDS})

    @app.post("/")
    def score_form():
        form = {name: request.form.get(name) for name, _ in FIELDS}
        try:
            return page(form, e=score(form))
        except _Busy as exc:
            return page(form, error=str(exc), status=503)
        except UserError as exc:
            return page(form, error=str(exc), status=400)

    @app.post("/api/score")
    def score_json():
        data = request.get_json(silent=True)
        if not isinstance(data, dict):
            return jsonify(error="expected a JSON object with prompt, response_a and response_b"), 400
        try:
            return jsonify(score(data).as_dict())
        except _Busy as exc:
            return jsonify(error=str(exc)), 503
        except UserError as exc:
            return jsonify(error=str(exc)), 400

    @app.errorhandler(413)
    def too_large(_):
        message = f"request too large: at most {max_bytes} bytes (serve --max-bytes to change)"
        if request.path.startswith("/api/"):
            return jsonify(error=message), 413
        return page({name: "" for name, _ in FIELDS}, error=message, status=413)

    return app


class _Busy(Exception):
    """Another scoring job holds the lock."""


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(run_dir, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
    """Load the run and serve its page until Ctrl-C (``port`` 0: a free port). Prints the address."""
    from werkzeug.serving import make_server

    if not is_loopback(host):
        log.warning("serve --host %s: the page is reachable from other machines and has no authentication; "
                    "anyone who reaches it can score pairs on this machine", host)
    if max_bytes < 1024:
        raise UserError(f"--max-bytes {max_bytes}: at least 1024")
    app = create_app(Predictor.load(run_dir, progress=False), max_bytes)
    try:
        server = make_server(host, port, app, threaded=True)
    except OSError as exc:
        raise UserError(f"serve: cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    shown = f"[{host}]" if ":" in host else host
    print(f"serving {run_dir} on http://{shown}:{server.server_port}/ (Ctrl-C to stop)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopped", flush=True)
    finally:
        server.server_close()
