-- KPI views over analytics.* events (issue 17): reserved; the views land with `edge-cloud report`.
SELECT 1;
