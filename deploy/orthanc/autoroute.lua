-- The demo PACS routes every CT series to lungnode once the series is stable
-- (no new instance for StableAge seconds). "lungnode" is the modality that
-- orthanc.json declares. lungnode's results come back into the same study as
-- Secondary Capture (OT), Encapsulated PDF (DOC) and SR: not CT, so never routed.
-- The whole series goes as one C-STORE job (Orthanc's REST route; Lua's own
-- SendToModality takes single instances), visible under /jobs.
-- Only Orthanc's own resource ids are logged, never patient data.

function OnStableSeries(seriesId, tags, metadata)
   if tags['Modality'] == 'CT' then
      local request = DumpJson({ Resources = { seriesId }, Asynchronous = true }, true)
      local job = ParseJson(RestApiPost('/modalities/lungnode/store', request))
      print('autoroute: CT series ' .. seriesId .. ' to lungnode, job ' .. job['ID'])
   end
end
