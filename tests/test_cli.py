"""What every command-line tool of the package shares: path flags read as the shell would have read them."""
import os

import pytest

from elit_kernels.bench.cli import build_parser as bench_parser
from elit_kernels.demo import build_parser as demo_parser
from elit_kernels.official.cli import build_parser as convert_parser
from elit_kernels.sample.cli import build_parser as sample_parser

# (parser, arguments that make it parse, the path destinations to look at)
CLIS = {
    "elit-sample": (sample_parser, ["CKPT", "--out", "O", "--vae", "V", "--class-file", "C"],
                    ("checkpoint", "out", "vae", "class_file")),
    "elit-convert": (convert_parser, ["CKPT", "--out", "O"], ("checkpoint", "out")),
    "elit-demo": (demo_parser, ["--out", "O", "--save", "S", "--load", "L"], ("out", "save", "load")),
    "elit-bench": (bench_parser, ["--out", "O", "--replot", "R"], ("out", "replot")),
}


@pytest.mark.parametrize("tool", sorted(CLIS))
@pytest.mark.parametrize("form", ["--flag=~/x", "--flag ~/x"])
def test_path_flags_expand_a_leading_tilde(tool, form, monkeypatch, tmp_path):
    # `--out=~/x` reaches argparse unexpanded (the shell expands ~ only at the start of a word): it must mean the
    # home folder, not create a folder named "~" in the working directory
    monkeypatch.setenv("HOME", str(tmp_path))
    build, argv, dests = CLIS[tool]
    parser = build()
    flags = {a.dest: (a.option_strings[0] if a.option_strings else None) for a in parser._actions}
    for dest in dests:
        args = list(argv)
        flag = flags[dest]
        if flag is None:  # the positional checkpoint
            args[0] = "~/x"
        else:
            i = args.index(flag)
            del args[i:i + 2]
            args += [f"{flag}=~/x"] if form == "--flag=~/x" else [flag, "~/x"]
        got = getattr(parser.parse_args(args), dest)
        assert got == os.path.join(str(tmp_path), "x"), (tool, dest, got)
    plain = parser.parse_args(argv)
    assert all(getattr(plain, d) == argv[argv.index(flags[d]) + 1] if flags[d] else getattr(plain, d) == argv[0]
               for d in dests)  # other paths untouched
