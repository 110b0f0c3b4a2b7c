"""Example pipelines' data generators and model factories (installed with ctrain: matches ``ctrain*``).

Each example is a definition in ``pipelines/<name>.yaml`` plus its Feast declarations in ``feature_repo/``;
the modules here make its landed data (``example.datagen`` of the definition). ctrain's generic code never
imports them.
"""
