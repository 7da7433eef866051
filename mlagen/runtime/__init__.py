"""What generated modules import at run time: kernel launch helpers, boundary
checks, rope, reference ops. Never imports sympy, jinja2, networkx, the passes
or codegen, so `import generated.<spec>` stays fast and light."""
