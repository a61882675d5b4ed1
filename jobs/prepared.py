"""Reads of the submit path written out once per process instead of compiled per request.

The ORM compiles a queryset anew on every evaluation; for the two reads every API submission
makes (its token with its user, its workload with its provider) that compile cost more than
the query (bench/submit.py). A `Select` builds its SQL from the models' metadata on first use
and afterwards only executes it, converting each column with the converters the ORM would
apply and linking the joined rows as `select_related` does. The statements are read afresh on
every request, so a token deleted or a user deactivated stops working at once, and a workload
paused in the admin is refused by the next submission. tests/jobs/test_prepared.py checks that
each returns what the ORM's queryset does.
"""

from __future__ import annotations

from typing import Any

from django.db import connections
from django.db.models import Model


class Select:
    """`SELECT <every concrete column of each model> FROM <first> JOIN ... WHERE <where>`.

    `models` is (model, foreign key on the first model to reach it) pairs, the first with None;
    `where` uses the table aliases t0, t1, ... in that order, and `%s` for parameters (values
    are always parameters; only names from the models' metadata are formatted in).
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
        for index, (model, via) in enumerate(self.models):
            fields = list(model._meta.concrete_fields)
            converters = []
            for field in fields:
                col = field.get_col(f"t{index}")
                found = connection.ops.get_db_converters(col) + field.get_db_converters(connection)
                converters.append((found, col))
            columns += [f"t{index}.{qn(field.column)}" for field in fields]
            layout.append((model, via, [f.attname for f in fields], converters))
            if via is not None:
                fk = first._meta.get_field(via)
                if fk.null:  # an INNER JOIN would drop the rows without one
                    raise ValueError(f"{first.__name__}.{via} may be null")
                joins.append(
                    f"INNER JOIN {qn(model._meta.db_table)} t{index} "
                    f"ON t{index}.{qn(fk.target_field.column)} = t0.{qn(fk.column)}"
                )
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
        instances, start = [], 0
        for model, via, names, converters in layout:
            values = list(row[start : start + len(names)])
            start += len(names)
            for position, (found, col) in enumerate(converters):
                for converter in found:
                    values[position] = converter(values[position], col, connection)
            instance = model.from_db(using, names, values)
            if via is not None:
                instances[0]._meta.get_field(via).set_cached_value(instances[0], instance)
            instances.append(instance)
        return instances[0]
