"""The plain task: a denoiser that generates from noise and a prompt, a label or nothing."""

from __future__ import annotations

from .registry import Task, register


class Generate(Task):
    name = "generate"
    summary = "a generation model"
    commands = ("generate", "sample", "img2img", "inpaint", "outpaint")
    routes = ("/v1/images/generations", "/sdapi/v1/txt2img", "/sdapi/v1/img2img", "/v1/jobs")


GENERATE = register(Generate())
