"""Hot reads written out once per process instead of compiled per request or per run.

The ORM compiles a queryset anew on every evaluation; for the two reads every API submission
makes (its token with its user, its workload with its provider) and the one every run starts
with (its job with its workload, provider and submitter) that compile cost more than the
query (bench/submit.py; PERF-NOTES: about half of the run's read). A `Select` builds its SQL
from the models' metadata on first use and afterwards only executes it, converting each column
with the converters the ORM would apply and linking the joined rows as `select_related` does.
The rows are read afresh every time, so a token deleted or a user deactivated stops working at
once, and a workload paused in the admin is refused by the next submission.
tests/jobs/test_prepared.py checks that each returns what the ORM's queryset does.
"""

from __future__ import annotations

from typing import Any

from django.db import connections
from django.db.models import Model


class Select:
    """`SELECT <every concrete column of each model> FROM <first> JOIN ... WHERE <where>`.

    `models` is (model, path) pairs, the first with None: a path names a foreign key of the
    first model ("workload") or of a model listed before it ("workload__provider"), as in
    `select_related`. A nullable key is a LEFT JOIN, and a row without one gets None cached,
    as `select_related` does. `where` uses the table aliases t0, t1, ... in that order, and
    `%s` for parameters (values are always parameters; only names from the models' metadata
    are formatted in).
    """

    def __init__(self, models: list[tuple[type[Model], str | None]], where: str) -> None:
        self.models = models
        self.where = where
        self._compiled: dict[str, tuple[str, list]] = {}  # per database alias

    def _compile(self, using: str) -> tuple[str, list]:
        connection = connections[using]
        qn = connection.ops.quote_name
        columns, joins, layout = [], [], []
        first = self.models[0][0]
        index_of: dict[str, int] = {}  # path -> alias number
        for index, (model, path) in enumerate(self.models):
            fields = list(model._meta.concrete_fields)
            converters = []
            for field in fields:
                col = field.get_col(f"t{index}")
                found = connection.ops.get_db_converters(col) + field.get_db_converters(connection)
                converters.append((found, col))
            columns += [f"t{index}.{qn(field.column)}" for field in fields]
            parent, fk = 0, None
            if path is not None:
                head, _, name = path.rpartition("__")
                parent = index_of[head] if head else 0
                fk = self.models[parent][0]._meta.get_field(name)
                if fk.related_model is not model:
                    raise ValueError(f"{path} does not lead to {model.__name__}")
                kind = "LEFT OUTER JOIN" if fk.null else "INNER JOIN"
                joins.append(
                    f"{kind} {qn(model._meta.db_table)} t{index} "
                    f"ON t{index}.{qn(fk.target_field.column)} = t{parent}.{qn(fk.column)}"
                )
                index_of[path] = index
            pk_position = fields.index(model._meta.pk)
            layout.append((model, parent, fk, [f.attname for f in fields], converters, pk_position))
        sql = (
            f"SELECT {', '.join(columns)} FROM {qn(first._meta.db_table)} t0 "  # noqa: S608
            f"{' '.join(joins)} WHERE {self.where}"
        )
        return sql, layout

    def get(self, params: list[Any], using: str = "default") -> Model | None:
        """The first model's instance of the one row found (its joined rows cached on it as
        `select_related` caches them), or None."""
        if using not in self._compiled:
            self._compiled[using] = self._compile(using)
        sql, layout = self._compiled[using]
        connection = connections[using]
        with connection.cursor() as cursor:
            cursor.execute(sql, params)
            row = cursor.fetchone()
        if row is None:
            return None
        instances: list[Model | None] = []
        start = 0
        for model, parent, fk, names, converters, pk_position in layout:
            values = list(row[start : start + len(names)])
            start += len(names)
            owner = instances[parent] if fk is not None else None
            if fk is not None and (owner is None or values[pk_position] is None):
                # No row joined (a null key): None, as select_related caches it.
                if owner is not None:
                    fk.set_cached_value(owner, None)
                instances.append(None)
                continue
            for position, (found, col) in enumerate(converters):
                for converter in found:
                    values[position] = converter(values[position], col, connection)
            instance = model.from_db(using, names, values)
            if fk is not None:
                fk.set_cached_value(owner, instance)
            instances.append(instance)
        return instances[0]
