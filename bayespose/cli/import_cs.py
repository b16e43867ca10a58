"""``bayespose import-cs``: a cryoSPARC ``.cs`` file as a RELION 3.1 star file."""

from __future__ import annotations

from pathlib import Path

from bayespose.cli._common import check_outputs, existing_file, positive_float


def add_parser(sub) -> None:
    p = sub.add_parser("import-cs", help="convert a cryoSPARC .cs file to a RELION 3.1 star file",
                       description="Read a cryoSPARC particle .cs (and its passthrough file) and write a RELION "
                                   "3.1 star file with the same poses, shifts and CTF.")
    p.add_argument("--cs", required=True, type=existing_file, help="cryoSPARC particles .cs file")
    p.add_argument("--passthrough", type=existing_file, help="passthrough .cs of the same job (CTF, blobs)")
    p.add_argument("--blob-root", type=Path,
                   help="folder the .cs blob paths are relative to (the cryoSPARC project folder)")
    p.add_argument("--pixel-size", type=positive_float, help="override the pixel size (Å/px)")
    p.add_argument("--out", required=True, type=Path, help="output .star file")
    p.set_defaults(func=run)


def run(args) -> int:
    from bayespose.core.io.cryosparc import read_cryosparc
    from bayespose.core.io.relion_star import write_star

    particles = read_cryosparc(args.cs, passthrough_path=args.passthrough, blob_root=args.blob_root,
                               pixel_size=args.pixel_size)
    check_outputs(files={"--out": args.out}, inputs={"--cs": args.cs, "--passthrough": args.passthrough},
                  particles=particles)
    write_star(args.out, particles)
    aligned = "with poses" if particles.has_alignment else "without poses"
    print(f"wrote {len(particles)} particles {aligned} to {args.out}")
    return 0
