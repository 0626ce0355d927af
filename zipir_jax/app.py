r"""A web page that restores one image at a time with a ZipIR bundle.

  python -m zipir_jax.app --checkpoint=BUNDLE [--port=7860] [--host=127.0.0.1]

Upload an image, choose the scale or an output size, the prompts and the sampling controls; the
page shows the input beside the restoration, offers the PNG for download, and shows a mistake (an
unreadable file, a bad value) as one line of text, never a stack trace.

Served by the standard library (``http.server``; one HTML page with plain JavaScript, the image
sent as a multipart form) rather than Gradio: nothing to install beyond the package itself, so
the page works wherever ``sample.py`` does, offline included, and no web framework's dependency
tree (FastAPI, pydantic, uvicorn, …) can conflict with the pinned JAX stack or change under it.
Restorations run one at a time (each holds the accelerator); the page goes through
:class:`~zipir_jax.api.ZipIRPipeline`, the same restore path as ``sample.py``.
"""

from __future__ import annotations

import argparse
import email.parser
import email.policy
import html
import io
import sys
import threading
import time
import traceback
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from zipir_jax import cli, image_io
from zipir_jax.errors import OptionError, ZipIRError

MAX_UPLOAD_BYTES = 64 * 2**20

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>ZipIR</title>
<style>
 body {{ font-family: sans-serif; margin: 1.5em; max-width: 70em; }}
 form {{ display: grid; grid-template-columns: max-content 1fr; gap: .4em 1em; max-width: 40em; }}
 input[type=text] {{ width: 100%; }}
 #views {{ display: flex; gap: 1em; margin-top: 1em; }}
 #views figure {{ margin: 0; flex: 1; }}
 #views img {{ width: 100%; image-rendering: pixelated; background: #eee; }}
 #views img:not([src]) {{ display: none; }}
 #error {{ color: #b00020; white-space: pre-wrap; }}
</style></head>
<body>
<h1>ZipIR restoration</h1>
<p>Bundle: <code>{bundle}</code></p>
<form id="form">
 <label for="image">Image</label><input id="image" name="image" type="file" accept="image/*" required>
 <label for="scale">Scale</label><input id="scale" name="scale" type="number" step="any" min="0" value="4">
 <label for="size">Size (HxW, instead of scale)</label><input id="size" name="size" type="text" placeholder="e.g. 2048x1536">
 <label for="prompt">Prompt</label><input id="prompt" name="prompt" type="text">
 <label for="negative_prompt">Negative prompt</label><input id="negative_prompt" name="negative_prompt" type="text" value="{negative_prompt}">
 <label for="strength">Strength (1 = from noise)</label><input id="strength" name="strength" type="number" step="any" min="0" max="1" value="{strength}">
 <label for="steps">DDIM steps</label><input id="steps" name="steps" type="number" min="1" value="{steps}">
 <label for="cfg">CFG scale</label><input id="cfg" name="cfg" type="number" step="any" value="{cfg}">
 <label for="seed">Seed</label><input id="seed" name="seed" type="number" value="0">
 <label for="color_fix">Colour fix</label><select id="color_fix" name="color_fix">{color_fixes}</select>
 <span></span><button id="restore" type="submit">Restore</button>
</form>
<p id="status"></p><p id="error"></p>
<div id="views">
 <figure><figcaption>Input</figcaption><img id="before" alt="input"></figure>
 <figure><figcaption>Restored <a id="download" hidden>download PNG</a></figcaption><img id="after" alt="restoration"></figure>
</div>
<script>
const form = document.getElementById("form"), status = document.getElementById("status");
const error = document.getElementById("error"), after = document.getElementById("after");
const before = document.getElementById("before"), download = document.getElementById("download");
document.getElementById("image").addEventListener("change", (e) => {{
  if (e.target.files.length) before.src = URL.createObjectURL(e.target.files[0]);
}});
form.addEventListener("submit", async (e) => {{
  e.preventDefault();
  const button = document.getElementById("restore"), start = Date.now();
  error.textContent = ""; status.textContent = "Restoring…"; button.disabled = true;
  after.removeAttribute("src"); download.hidden = true;
  try {{
    const response = await fetch("restore", {{method: "POST", body: new FormData(form)}});
    if (!response.ok) {{
      error.textContent = await response.text(); status.textContent = "";
      return;
    }}
    const url = URL.createObjectURL(await response.blob());
    after.src = url; download.href = url; download.hidden = false;
    download.download = response.headers.get("X-Filename") || "restored.png";
    status.textContent = "Restored to " + response.headers.get("X-Size") + " in " +
      ((Date.now() - start) / 1000).toFixed(1) + " s";
  }} catch (err) {{
    error.textContent = "The server cannot be reached (" + err + ")"; status.textContent = "";
  }} finally {{
    button.disabled = false;
  }}
}});
</script>
</body></html>
"""


def render_page(pipe: Any, bundle: str) -> str:
  """The page, its defaults from the bundle's config."""
  from zipir_jax import restore  # pylint: disable=g-import-not-at-top

  config = pipe.config
  fixes = "".join(
    f'<option value="{m}"{" selected" if m == config.restore.color_fix else ""}>{m}</option>'
    for m in restore.COLOR_FIXES
  )
  return PAGE.format(
    bundle=html.escape(bundle),
    negative_prompt=html.escape(config.diffusion.negative_prompt),
    strength=config.diffusion.strength,
    steps=config.diffusion.sample_steps,
    cfg=config.diffusion.cfg_scale,
    color_fixes=fixes,
  )


def parse_form(content_type: str, body: bytes) -> dict[str, tuple[str | None, bytes]]:
  """A multipart/form-data body -> {field: (file name or None, bytes)}."""
  if not content_type.startswith("multipart/form-data"):
    raise OptionError(f"expected a multipart/form-data upload, got {content_type or 'nothing'}")
  message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
    b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + body
  )
  fields = {}
  for part in message.iter_parts():
    name = part.get_param("name", header="content-disposition")
    if name:
      fields[name] = (part.get_filename(), part.get_payload(decode=True) or b"")
  return fields


def _number(fields: dict, name: str, kind: type, default: Any = None) -> Any:
  text = fields.get(name, (None, b""))[1].decode("utf-8").strip()
  if not text:
    return default
  try:
    return kind(text)
  except ValueError:
    raise OptionError(
      f"{name}={text!r}: not {'an integer' if kind is int else 'a number'}"
    ) from None


def restore_upload(
  pipe: Any, fields: dict[str, tuple[str | None, bytes]]
) -> tuple[bytes, str, tuple[int, int]]:
  """The form's image restored with its settings: (PNG bytes, output file name, (W, H))."""
  filename, data = fields.get("image", (None, b""))
  if not filename:
    raise OptionError("no image: choose a file to upload")
  text = lambda name: fields.get(name, (None, b""))[1].decode("utf-8").strip()
  size_text, size = text("size"), None
  if size_text:
    try:
      size = tuple(int(v) for v in size_text.lower().split("x"))
    except ValueError:
      size = ()
    if len(size) != 2:
      raise OptionError(f"size={size_text!r}: expected HxW, e.g. 2048x1536")
  options = dict(
    steps=_number(fields, "steps", int),
    cfg=_number(fields, "cfg", float),
    strength=_number(fields, "strength", float),
    seed=_number(fields, "seed", int, 0),
    color_fix=text("color_fix") or None,
    negative_prompt=fields["negative_prompt"][1].decode("utf-8")
    if "negative_prompt" in fields
    else None,
  )
  from zipir_jax import api  # pylint: disable=g-import-not-at-top

  api.restore_options(**options)  # options first: a bad value is named before any decoding
  image = pipe.prepare(image_io.decode_named(data, filename), filename)
  restored = pipe(
    image,
    scale=None if size else _number(fields, "scale", float),
    size=size,
    prompt=text("prompt"),
    output_type="pil",
    progress=False,
    **options,
  )
  buffer = io.BytesIO()
  restored.save(buffer, format="PNG")
  stem = filename.rsplit("/", 1)[-1].rsplit("\\", 1)[-1].rsplit(".", 1)[0] or "image"
  return buffer.getvalue(), f"{stem}_zipir.png", restored.size


def make_server(
  pipe: Any, host: str = "127.0.0.1", port: int = 7860, bundle: str = ""
) -> ThreadingHTTPServer:
  """A server for the page (port 0: any free port, see ``server.server_address``)."""
  page = render_page(pipe, bundle).encode("utf-8")
  lock = threading.Lock()  # one restoration at a time: each holds the device

  class Handler(BaseHTTPRequestHandler):
    def _send(self, status: int, body: bytes, content_type: str, headers: dict | None = None):
      self.send_response(status)
      self.send_header("Content-Type", content_type)
      self.send_header("Content-Length", str(len(body)))
      for key, value in (headers or {}).items():
        self.send_header(key, value)
      self.end_headers()
      self.wfile.write(body)

    def _text(self, status: int, message: str) -> None:
      self._send(status, message.encode("utf-8"), "text/plain; charset=utf-8")

    def do_GET(self):
      if self.path in ("/", "/index.html"):
        self._send(HTTPStatus.OK, page, "text/html; charset=utf-8")
      else:
        self._text(HTTPStatus.NOT_FOUND, f"{self.path}: no such page")

    def do_POST(self):
      if self.path != "/restore":
        return self._text(HTTPStatus.NOT_FOUND, f"{self.path}: no such page")
      length = int(self.headers.get("Content-Length") or 0)
      if length > MAX_UPLOAD_BYTES:
        return self._text(
          HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
          f"upload of {length / 2**20:.0f} MiB is larger than {MAX_UPLOAD_BYTES // 2**20} MiB",
        )
      try:
        fields = parse_form(self.headers.get("Content-Type", ""), self.rfile.read(length))
        with lock:
          start = time.time()
          png, name, (w, h) = restore_upload(pipe, fields)
        self.log_message("restored %s to %dx%d in %.1f s", name, w, h, time.time() - start)
        self._send(HTTPStatus.OK, png, "image/png", {"X-Filename": name, "X-Size": f"{w}x{h}"})
      except ZipIRError as e:  # the user's mistake: say it in their words
        self._text(HTTPStatus.BAD_REQUEST, " ".join(str(e).split()))
      except Exception as e:  # pylint: disable=broad-except  # a bug: one line here, trace in the log
        traceback.print_exc()
        self._text(HTTPStatus.INTERNAL_SERVER_ERROR, f"internal error ({type(e).__name__}): {e}")

    def log_message(self, format, *args):
      sys.stderr.write(f"[{time.strftime('%H:%M:%S')}] {format % args}\n")

  return ThreadingHTTPServer((host, port), Handler)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
    prog="python -m zipir_jax.app", description=__doc__.split("\n")[0]
  )
  parser.add_argument("--checkpoint", required=True, help="bundle folder (either layout)")
  parser.add_argument("--port", type=int, default=7860)
  parser.add_argument("--host", default="127.0.0.1", help="0.0.0.0 serves other machines too")
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None)
  parser.add_argument("--verbosity", type=int, default=0, help="1: library INFO logs")
  args = parser.parse_args(argv)
  cli.quiet_library_logs(args.verbosity)
  from zipir_jax import api  # pylint: disable=g-import-not-at-top

  try:
    pipe = api.ZipIRPipeline.from_pretrained(args.checkpoint, dtype=args.dtype)
    server = make_server(pipe, args.host, args.port, args.checkpoint)
  except cli.USER_ERRORS as e:
    return cli.fail(e, status=2)
  host, port = server.server_address[:2]
  print(f"ZipIR page at http://{host}:{port}/  (Ctrl-C stops)", flush=True)
  try:
    server.serve_forever()
  except KeyboardInterrupt:
    pass
  finally:
    server.server_close()
  return 0


if __name__ == "__main__":
  sys.exit(main())
