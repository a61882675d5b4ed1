"""Django's template backend, except that a page never fails to encode.

A page is encoded as UTF-8 after it is rendered, and a lone surrogate (what a JSON `"\\ud800"`
escape decodes to) cannot be: one such value stored in a JSON column (a batch row uploaded
before the edge checked it, a model's parsed output) made every page showing it answer 500,
for everyone. The edge refuses such text now (jobs.inputs); this is the second line, for what
was stored before or comes from elsewhere: it shows U+FFFD in its place. Costs one encode of
the rendered text when it is clean.
"""

from __future__ import annotations

from django.template import TemplateDoesNotExist
from django.template.backends import django as backend

from jobs.inputs import scrub


class Template(backend.Template):
    def render(self, context=None, request=None) -> str:
        return scrub(super().render(context, request))


class DjangoTemplates(backend.DjangoTemplates):
    def from_string(self, template_code: str) -> Template:
        return Template(self.engine.from_string(template_code), self)

    def get_template(self, template_name: str) -> Template:
        try:
            return Template(self.engine.get_template(template_name), self)
        except TemplateDoesNotExist as exc:
            backend.reraise(exc, self)
